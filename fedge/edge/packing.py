"""One array per ArrayRecord on the wire between `fedge server` and its devices.

Flower 1.42 sends every array of a message as two objects (the array and its chunk), each
pushed and pulled through the SuperLink by an HTTP request of its own: the digits CNN's 8
tensors make a train message of 20 objects, MobileLLM's dozens of tensors a hundred. A
SuperLink request costs milliseconds of CPU whatever its size, so the number of objects, not
the bytes, sets a deployed round's overhead. `pack` joins the arrays of each ArrayRecord
into one (their bytes back to back, as Flower serialised them) and records where each one
lies; `unpack` restores the ArrayRecord exactly. The server's grid packs what it sends and
unpacks what comes back (`fedge.server.polling.PromptGrid`); `packing_mod` does the same on
the device, so strategies and the ClientApp never see a packed record.
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

PACKED_STYPE = "fedge.packed"  # the stype of a packed array: Flower arrays back to back
LAYOUT = "fedge-layout."  # prefix of the ConfigRecord that says where each array lies
KEYS, DTYPES, SHAPES, STYPES, SIZES = "keys", "dtypes", "shapes", "stypes", "sizes"


def pack(content: RecordDict) -> RecordDict:
    """`content` with each ArrayRecord of more than one array joined into one array."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            arrays = list(record.items())
            out[name] = ArrayRecord(
                {name: Array("uint8", (0,), PACKED_STYPE, b"".join(a.data for _, a in arrays))}
            )
            out[LAYOUT + name] = ConfigRecord(
                {
                    KEYS: [k for k, _ in arrays],
                    DTYPES: [a.dtype for _, a in arrays],
                    SHAPES: [",".join(map(str, a.shape)) for _, a in arrays],
                    STYPES: [a.stype for _, a in arrays],
                    SIZES: [len(a.data) for _, a in arrays],
                }
            )
        else:
            out[name] = record
    return out


def is_packed(content: RecordDict) -> bool:
    return any(name.startswith(LAYOUT) for name in content)


def unpack(content: RecordDict) -> RecordDict:
    """The RecordDict `pack` was given; a layout that does not fit its data is an error."""
    out = RecordDict()
    for name, record in content.items():
        if name.startswith(LAYOUT):
            continue
        layout = content.get(LAYOUT + name)
        if layout is None:
            out[name] = record
            continue
        (packed,) = record.values()
        columns = [layout[c] for c in (KEYS, DTYPES, SHAPES, STYPES, SIZES)]
        if not all(isinstance(c, list) for c in columns) or not isinstance(packed, Array):
            raise ValueError(f"packed record {name!r}: its layout is damaged")
        keys, dtypes, shapes, stypes, sizes = (cast(list[Any], c) for c in columns)
        if sum(int(n) for n in sizes) != len(packed.data):
            raise ValueError(f"packed record {name!r}: its layout does not fit its bytes")
        arrays, start = {}, 0
        for key, dtype, shape, stype, size in zip(keys, dtypes, shapes, stypes, sizes, strict=True):
            dims = tuple(int(d) for d in str(shape).split(",") if d)
            arrays[str(key)] = Array(
                str(dtype), dims, str(stype), packed.data[start : start + size]
            )
            start += size
        out[name] = ArrayRecord(arrays)
    return out


def packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A `flwr.clientapp` mod: unpack a packed instruction, pack its reply the same way."""
    if msg.has_error() or not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content = pack(reply.content)
    return reply
