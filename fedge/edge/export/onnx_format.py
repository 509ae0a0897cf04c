"""ONNX: torch.onnx's dynamo exporter from the exported program, onnxruntime to run it, and
onnxruntime's static int8 quantization (QDQ, per-channel weights) calibrated on samples."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram

from fedge.edge.export.program import ExportError, Inputs, first_line, operator_in

SUFFIX = ".onnx"


def write(program: ExportedProgram, path: Path) -> None:
    """The program as an ONNX file; an ExportError names an operator ONNX cannot express."""
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
        if onnx_program is None:  # only the legacy exporter returns None
            raise RuntimeError("torch.onnx.export returned no program")
        onnx_program.save(str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export failed{operator_in(exc)}: {first_line(exc)}") from exc


def quantize(fp32: Path, path: Path, calibration: Iterable[Inputs]) -> None:
    """Static int8 quantization of the ONNX file `fp32` into `path`: activation ranges from
    running `calibration` batches, weights per output channel."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    names = [i.name for i in Model(fp32).session.get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([feed(names, inputs) for inputs in calibration])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns on the root logger for every 1-D weight
    try:
        quantize_static(fp32, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    except Exception as exc:
        raise ExportError(f"ONNX int8 quantization failed: {first_line(exc)}") from exc
    finally:
        root.setLevel(level)


def feed(names: list[str], inputs: Inputs) -> dict:
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX model takes {names}, the task gives {len(inputs)} inputs")
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


class Model(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like the torch model it came from."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime picks (all cores)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime names the node and op type it cannot run
            raise ExportError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.session.run(None, feed(self.names, inputs))
        return torch.from_numpy(outputs[0])
