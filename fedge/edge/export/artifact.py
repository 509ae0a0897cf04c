"""Export a task's model to a device format and check it against torch before writing it.

The artifact is built in a temporary folder beside `out`, run in its runtime on the whole
test set next to the torch model, and moved to `out` only when its fp32 outputs are within
`tolerance` of torch's: a file at `out` is always one that was checked.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import Dataset

from fedge.edge.export import onnx_format, pte_format
from fedge.edge.export.program import (
    ExportError,
    batches,
    bounds,
    calibration_set,
    dynamic_shapes,
    export_program,
    widest,
)
from fedge.errors import ConfigError, did_you_mean
from fedge.tasks.base import Task

FORMATS: dict[str, ModuleType] = {"executorch": pte_format, "onnx": onnx_format}
QUANTIZE = ("int8",)
TOLERANCE = 1e-4  # fp32 max |exported - torch| over the test set's outputs


@dataclass
class ExportReport:
    """What an export wrote and how it compares with torch on the test set.

    max_abs_diff: over every output of every test sample (fp32 artifact, and the int8 one
    when quantized). metrics: the task's metrics of "torch", "fp32" and, quantized, "int8".
    """

    path: Path
    format: str
    quantize: str | None
    size_bytes: int
    metric: str
    max_abs_diff: dict[str, float]
    metrics: dict[str, dict[str, float]]
    seconds: float
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)


class Compared(nn.Module):
    """Runs the exported model and, beside it, the torch model; keeps the largest gap."""

    def __init__(self, reference: nn.Module, exported: nn.Module) -> None:
        super().__init__()
        self.reference, self.exported, self.max_diff = reference, exported, 0.0

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        want, got = self.reference(*inputs), self.exported(*inputs)
        if want.shape != got.shape:
            raise ExportError(f"the exported model returns {tuple(got.shape)}, torch {want.shape}")
        self.max_diff = max(self.max_diff, float((want - got).abs().max()))
        return got


def check_format(fmt: str, quantize: str | None) -> ModuleType:
    if fmt not in FORMATS:
        raise ConfigError(
            f"unknown export format {fmt!r}{did_you_mean(fmt, FORMATS)}; "
            f"choose one of {sorted(FORMATS)}"
        )
    if quantize not in (None, *QUANTIZE):
        raise ConfigError(f"--quantize {quantize!r}: choose one of {list(QUANTIZE)}")
    try:
        if fmt == "executorch":
            import executorch  # noqa: F401
        else:
            import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"the {fmt} exporter is not installed: `pip install 'fedge[export]'` (make does it)"
        ) from None
    return FORMATS[fmt]


def export_model(
    task: Task,
    model: nn.Module,
    fmt: str,
    out: str | Path,
    quantize: str | None = None,
    tolerance: float = TOLERANCE,
    batch_size: int = 32,
    calibration_size: int = 64,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> ExportReport:
    """`model` (trained for `task`) as a `fmt` artifact at `out`, int8 if `quantize`.

    Checked on the task's whole test set in the runtime: an fp32 artifact whose outputs differ
    from torch by more than `tolerance` is not written (ExportError), and neither is an int8
    one made from it. int8 ranges come from `calibration_size` training-pool samples.
    """
    backend = check_format(fmt, quantize)
    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    test = task.test_dataset()
    calibration = calibration_set(task, calibration_size, seed) if quantize else None
    example, shapes = widest(task, test, batch_size)
    if calibration is not None:
        shapes += widest(task, calibration, batch_size)[1]
    say(f"tracing the model on inputs {[tuple(t.shape) for t in example]}")
    program = export_program(model, example, shapes)
    report = ExportReport(out, fmt, quantize, 0, task.metric, {}, {}, 0.0, bounds(program))
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        fp32 = Path(tmp) / f"fp32{backend.SUFFIX}"
        say(f"writing {fmt} (fp32)")
        backend.write(program, fp32)
        with torch.no_grad():
            report.metrics["torch"] = Task.evaluate(task, model, test, batch_size)
        say(f"checking it in the runtime on {len(test)} test samples")  # type: ignore[arg-type]
        check(task, test, model, backend.Model(fp32), "fp32", report, batch_size)
        if report.max_abs_diff["fp32"] > tolerance:
            raise ExportError(
                f"the {fmt} model's outputs differ from torch's by up to "
                f"{report.max_abs_diff['fp32']:.3g} (> tolerance {tolerance:g}); nothing was "
                "written. An operator is lowered differently: try the other format"
            )
        chosen = fp32
        if quantize and calibration is not None:
            chosen = Path(tmp) / f"int8{backend.SUFFIX}"
            calib = list(batches(task, calibration, batch_size))
            say(f"quantizing to int8 on {len(calibration)} calibration samples")  # type: ignore[arg-type]
            if backend is onnx_format:
                onnx_format.quantize(fp32, chosen, calib)
            else:
                dims = dynamic_shapes(shapes)
                pte_format.write(pte_format.quantized_program(model, example, dims, calib), chosen)
            check(task, test, model, backend.Model(chosen), "int8", report, batch_size)
        report.size_bytes = chosen.stat().st_size
        os.replace(chosen, out)
    report.seconds = time.perf_counter() - start
    return report


def check(
    task: Task,
    test: Dataset,
    model: nn.Module,
    exported: nn.Module,
    name: str,
    report: ExportReport,
    batch_size: int,
) -> None:
    """The task's metrics of `exported` on the test set, and its largest gap to torch.

    `Task.evaluate`, not the task's own: its metrics from eval sums alone, without a task's
    extras that inspect a torch model's modules (ASR's energy estimate)."""
    compared = Compared(model, exported)
    with torch.no_grad():
        report.metrics[name] = Task.evaluate(task, compared, test, batch_size)
    report.max_abs_diff[name] = compared.max_diff
