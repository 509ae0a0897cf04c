"""Simulated misbehaving clients, for fault-tolerance tests and robustness experiments.

A run's `faults` option, `KIND[=ARG]:FRACTION[,KIND[=ARG]:FRACTION...]`, makes a fixed,
seeded set of partitions misbehave every round they are sampled; a SuperNode started with
`--node-config 'fault="KIND[=ARG]"'` misbehaves whatever the run says. Kinds:

- `nan`, `inf`: one weight of the update is NaN / +Inf.
- `shape`: the first tensor loses its last row; `dtype`: the first float tensor is sent as float16.
- `signflip=S` (S default 4): sends w - S * (w_local - w), the update reversed and boosted,
  a Byzantine client that passes the norm check (S * 20% of clients cancels FedAvg at S = 4).
- `noise=S` (S default 1): every float weight gets Gaussian noise of standard deviation S
  (the same draw on every noisy client: they collude).
- `scale=S` (S default 1000): the update multiplied by S, an absurd norm.
- `corrupt`: the first tensor's bytes are cut in half, so they no longer decode.
- `slow=SECONDS` (default 60): answers after sleeping; `crash`: the ClientApp raises;
  `exit`: the client's process dies on the spot (a device killed mid-round; in simulation
  use the ray backend, whose actors are processes of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_ARG = {
    "nan": 0.0,
    "inf": 0.0,
    "shape": 0.0,
    "dtype": 0.0,
    "signflip": 4.0,
    "noise": 1.0,
    "scale": 1000.0,
    "corrupt": 0.0,
    "slow": 60.0,
    "crash": 0.0,
    "exit": 0.0,
}


@dataclass(frozen=True)
class Fault:
    """One kind of misbehaviour, its strength `arg`, and the fraction of clients it hits."""

    kind: str
    arg: float
    fraction: float = 1.0


def parse_fault(text: str, fraction: float = 1.0) -> Fault:
    """`KIND` or `KIND=ARG`, e.g. `signflip=4`, `slow=30`."""
    kind, sep, raw = text.strip().partition("=")
    if kind not in DEFAULT_ARG:
        raise ValueError(f"unknown fault {kind!r}; choose one of {sorted(DEFAULT_ARG)}")
    try:
        arg = float(raw) if sep else DEFAULT_ARG[kind]
    except ValueError:
        raise ValueError(f"fault {text!r}: {raw!r} is not a number") from None
    return Fault(kind, arg, fraction)


def parse_faults(spec: str) -> list[Fault]:
    """`KIND[=ARG]:FRACTION,...`; the fractions must add up to at most 1."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        text, sep, frac = item.rpartition(":")
        if not sep:
            raise ValueError(f"fault {item!r}: expected KIND[=ARG]:FRACTION, e.g. signflip:0.2")
        try:
            fraction = float(frac)
        except ValueError:
            raise ValueError(f"fault {item!r}: fraction {frac!r} is not a number") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"fault {item!r}: fraction must be in (0, 1]")
        faults.append(parse_fault(text, fraction))
    if sum(f.fraction for f in faults) > 1 + 1e-9:
        raise ValueError(f"faults {spec!r}: the fractions add up to more than 1")
    return faults


def fault_for(spec: str, partition_id: int, num_partitions: int, seed: int) -> Fault | None:
    """The fault partition `partition_id` simulates under the run's `spec`, if any.

    A seeded permutation of the partitions is cut into consecutive blocks, one per fault,
    of round(fraction x num_partitions) partitions each: every process computes the same sets.
    """
    faults = parse_faults(spec)
    if not faults:
        return None
    order = np.random.default_rng(seed + 7919).permutation(num_partitions)
    rank = int(np.flatnonzero(order == partition_id)[0])
    start = 0
    for fault in faults:
        stop = start + round(fault.fraction * num_partitions)
        if start <= rank < stop:
            return fault
        start = stop
    return None
