"""Export a run's global model for inference-only deployment: ExecuTorch (`.pte`, XNNPACK)
or ONNX (onnxruntime), fp32 or int8, checked against torch on the test set."""

from fedge.edge.export.artifact import FORMATS, TOLERANCE, ExportReport, export_model
from fedge.edge.export.program import ExportError, LoadedRun, load_run

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportError",
    "ExportReport",
    "LoadedRun",
    "export_model",
    "load_run",
]
