"""Helpers for the numba intrinsics of the PIR kernels and the DPF expansion: 512-bit vectors of
uint64 words over C-contiguous arrays, and which vector instructions this CPU has."""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import types

SLAB = ir.VectorType(ir.IntType(64), 8)  # 64 bytes: one zmm, or two ymm registers


def host_has(*features: str) -> bool:
    """Whether this CPU (as LLVM, which numba compiles for, sees it) has these features."""
    host = llvm.get_host_cpu_features()
    return all(host.get(f, False) for f in features)


def word_ptr(context, builder, array_type, array, offset):
    """Pointer to the uint64 word at flat `offset` of a C-contiguous array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [offset])


def slab_ptr(context, builder, array_type, array, offset):
    """Pointer to the 8 words at flat `offset` of a C-contiguous array."""
    return builder.bitcast(word_ptr(context, builder, array_type, array, offset), SLAB.as_pointer())


def check_c_arrays(*arrays: types.Type) -> None:
    """Intrinsics index raw memory: refuse anything but C-contiguous uint64 arrays at typing."""
    for a in arrays:
        if not (isinstance(a, types.Array) and a.dtype == types.uint64 and a.layout == "C"):
            raise numba.core.errors.TypingError(f"needs C-contiguous uint64 arrays, got {a}")
