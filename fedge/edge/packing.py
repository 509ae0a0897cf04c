"""Few objects per message on the wire between `fedge server` and its devices.

Flower 1.42 sends every record and every array of a message as objects (an array as two:
itself and its chunk), each pushed and pulled through the SuperLink by an HTTP request of
its own: the digits CNN's train message is 20 objects, MobileLLM's a hundred. A SuperLink
request costs milliseconds of CPU whatever its size, so the number of objects, not the
bytes, sets a deployed round's overhead. `pack` puts a whole message content that fits in
one of Flower's array chunks (`WHOLE_MAX`) into one bytes value (a message is then three
objects: itself, its RecordDict, one ConfigRecord); a bigger content keeps its records and
has each ArrayRecord's arrays joined into one (their bytes back to back, as Flower
serialised them, with a record saying where each lies), so Flower still chunks it.
`unpack` restores the content exactly. The server's grid packs what it sends and unpacks
what comes back (`fedge.server.polling.PromptGrid`); `packing_mod` does the same on the
device, so strategies and the ClientApp never see a packed record.
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedge import compat

WHOLE = "fedge-whole"  # the record (and its key) holding a whole content as bytes
WHOLE_MAX = 5 * 2**20  # array bytes up to which a content travels whole (a Flower chunk)
PACKED_STYPE = "fedge.packed"  # the stype of a packed array: Flower arrays back to back
LAYOUT = "fedge-layout."  # prefix of the ConfigRecord that says where each array lies
KEYS, DTYPES, SHAPES, STYPES, SIZES = "keys", "dtypes", "shapes", "stypes", "sizes"


def pack(content: RecordDict, whole_max: int = WHOLE_MAX) -> RecordDict:
    """`content` as one bytes value if its arrays hold at most `whole_max` bytes, else with
    each ArrayRecord of more than one array joined into one array."""
    array_bytes = sum(
        len(a.data) for r in content.values() if isinstance(r, ArrayRecord) for a in r.values()
    )
    if array_bytes <= whole_max:
        return RecordDict({WHOLE: ConfigRecord({WHOLE: compat.recorddict_bytes(content)})})
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
    return WHOLE in content or any(name.startswith(LAYOUT) for name in content)


def unpack(content: RecordDict) -> RecordDict:
    """The RecordDict `pack` was given; bytes or a layout that do not fit are an error."""
    if WHOLE in content:
        whole = content[WHOLE]
        data = whole.get(WHOLE) if isinstance(whole, ConfigRecord) else None
        if not isinstance(data, bytes):
            raise ValueError("packed message: its content is damaged")
        try:
            return compat.recorddict_from_bytes(data)
        except ValueError as exc:
            raise ValueError(f"packed message: its content is damaged ({exc})") from exc
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
