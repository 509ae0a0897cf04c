"""Simulated faults applied on a client: the reply's timing, and the arrays it sends.

The fault grammar (which kinds exist, which partitions misbehave) is `fedge.faults`.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import Array, ArrayRecord

from fedge.faults import Fault


def misbehave(fault: Fault) -> None:
    """The faults that act on the reply's timing or existence: sleep, or raise."""
    if fault.kind == "slow":
        time.sleep(fault.arg)
    elif fault.kind == "crash":
        raise RuntimeError("simulated client crash (fault 'crash')")
    elif fault.kind == "exit":
        os._exit(1)


def corrupt(
    fault: Fault, state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The update a client with `fault` sends instead of `state` (trained from `sent`)."""
    out = {k: v.clone() for k, v in state.items()}
    floats = [k for k, v in out.items() if v.is_floating_point()]
    if not floats:
        return out
    first = floats[0]
    if fault.kind in ("nan", "inf"):
        out[first].view(-1)[0] = float(fault.kind)
    elif fault.kind == "shape":
        out[first] = out[first][:-1] if out[first].dim() else out[first].reshape(1, 1)
    elif fault.kind == "dtype":
        out[first] = out[first].half()
    elif fault.kind in ("signflip", "scale"):
        factor = -fault.arg if fault.kind == "signflip" else fault.arg
        for k in floats:
            out[k] = (sent[k] + factor * (state[k] - sent[k])).to(state[k].dtype)
    elif fault.kind == "noise":
        gen = torch.Generator().manual_seed(0)
        for k in floats:
            out[k] = state[k] + fault.arg * torch.randn(state[k].shape, generator=gen)
    return out


def _cut_payload(arrays: ArrayRecord) -> ArrayRecord:
    """The record with its first tensor's bytes cut in half (fault `corrupt`)."""
    out = ArrayRecord({k: arrays[k] for k in arrays})
    key = next(iter(arrays))
    a = arrays[key]
    out[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[: len(a.data) // 2])
    return out


def faulty_arrays(
    fault: Fault, state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]
) -> ArrayRecord:
    """What a client with `fault` replies instead of `state`: after sleeping or raising
    (`misbehave`), the tensors corrupted, then, for `corrupt`, the encoded bytes."""
    misbehave(fault)
    arrays = ArrayRecord(corrupt(fault, state, sent))
    return _cut_payload(arrays) if fault.kind == "corrupt" and len(arrays) else arrays
