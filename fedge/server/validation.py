"""Server-side checks of every training reply before the strategy may aggregate it.

A reply that fails a check becomes an error reply with the reason, so no strategy ever sees
it: wrong keys, shapes or dtypes (against the server's own model), NaN or Inf anywhere, or an
update whose norm ||w_k - w_t|| is more than `max_update_norm` times ||w_t||.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from fedge.data.stats import relative_distance
from fedge.wire import ARRAYS


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why `arrays` cannot be the model described by `reference` (keys, shapes, dtypes)."""
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in arrays if k not in reference]
    if missing or extra:
        return f"tensor names differ from the model's (missing {missing[:3]}, extra {extra[:3]})"
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(got.shape)}, the model has {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{key}: dtype {got.dtype}, the model has {ref.dtype}"
    return None


def decode_finite(arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], str | None]:
    """The record's tensors as numpy arrays, and the first that holds NaN or Inf or cannot
    be decoded (then the arrays are incomplete)."""
    values: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        try:
            values[key] = array.numpy()
        except Exception as exc:  # a corrupt payload must not stop the round
            return values, f"{key}: cannot be decoded ({exc})"
        if np.issubdtype(values[key].dtype, np.floating) and not np.isfinite(values[key]).all():
            bad = int((~np.isfinite(values[key])).sum())
            return values, f"{key}: {bad} NaN/Inf value(s)"
    return values, None


def check_update(
    reply: Message,
    sent: Mapping[str, np.ndarray],
    reference: ArrayRecord,
    max_update_norm: float,
) -> tuple[str | None, float | None]:
    """Why this training reply must not reach aggregation (None if it may), and its drift
    ||w_k - w_t|| / ||w_t|| (None if the model was not readable), measured here once so that
    the round's drift metrics need no second decode.

    `sent` is the global model the client trained from (decoded once per round by the
    caller); `reference` is the server's own model (its shapes and dtypes: FedAvg may have
    turned integer buffers into floats in `sent`); `max_update_norm` <= 0 switches the norm
    check off.
    """
    if reply.has_error():
        return None, None  # already a failure
    if ARRAYS not in reply.content.array_records:
        return f"the reply has no {ARRAYS!r} ArrayRecord", None
    reason = check_arrays(reply.content.array_records[ARRAYS], reference)
    if reason:
        return reason, None
    for name, record in reply.content.array_records.items():
        values, reason = decode_finite(record)
        if reason:
            return reason, None
        if name == ARRAYS:
            model = values
    drift = relative_distance(model, sent)
    if 0 < max_update_norm < drift:
        limit = f"limit {max_update_norm:g}: --max-update-norm"
        return f"update norm is {drift:.3g} x the model's norm ({limit})", drift
    return None, drift
