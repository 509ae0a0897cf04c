"""ExecuTorch: the exported program lowered to the XNNPACK delegate (`.pte`), run by
ExecuTorch's runtime; int8 by PT2E quantization with XNNPACK's quantizer (symmetric,
per-channel weights) calibrated on samples, then lowered the same way. Operators XNNPACK
does not take run in ExecuTorch's portable kernels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from fedge.edge.export.program import ExportError, Inputs, first_line, operator_in

SUFFIX = ".pte"


def write(program: ExportedProgram, path: Path) -> None:
    """The program lowered to XNNPACK as a `.pte` file; ExportError names the operator
    ExecuTorch has no kernel for."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path.write_bytes(edge.to_executorch().buffer)
    except Exception as exc:
        raise ExportError(f"ExecuTorch export failed{operator_in(exc)}: {first_line(exc)}") from exc


def quantized_program(
    model: nn.Module, example: Inputs, shapes: Any, calibration: Iterable[Inputs]
) -> ExportedProgram:
    """The model with int8 weights and activations (PT2E), re-exported for lowering."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    try:
        graph = torch.export.export(model, example, dynamic_shapes=shapes).module()
        observed = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for inputs in calibration:
                observed(*inputs)
        return torch.export.export(convert_pt2e(observed), example, dynamic_shapes=shapes)
    except Exception as exc:
        raise ExportError(
            f"PT2E int8 quantization failed{operator_in(exc)}: {first_line(exc)}"
        ) from exc


def set_threads(threads: int) -> None:
    """XNNPACK's thread pool size for every loaded program (a device core count)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


class Model(nn.Module):
    """A `.pte` file's `forward` run by ExecuTorch, called like the torch model it came from."""

    def __init__(self, path: Path, method: str = "forward") -> None:
        super().__init__()
        from executorch.runtime import Runtime

        try:
            self.method = Runtime.get().load_program(path).load_method(method)
        except Exception as exc:  # the runtime logs the missing kernel, and raises
            raise ExportError(f"ExecuTorch cannot load {path}: {first_line(exc)}") from exc

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute(list(inputs))[0]
