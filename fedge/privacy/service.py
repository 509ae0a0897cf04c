"""gRPC PIR servers and the private-embedding client, with no generated code.

Two methods on service `fedge.pir.PIR`, raw bytes in and out (gRPC generic handlers):

- `Info`: JSON describing the table (party, rows, dtype, row shape, SHA-256 digest), so a client
  can check that both servers hold the same table before trusting the XOR of their answers;
- `Answer`: a framed batch of serialized DPF keys in, the batch's answers out. Requests that
  arrive together (many clients) are answered by one pass over the table.

Frames (little-endian): request  b"PIRQ" u8 version, u32 count, u32 key_len, count keys;
                       response b"PIRA" u8 version, u32 count, u32 words, 16-byte digest, answers.

`serve` runs one party; `fedge pir-server` is its command line (fedge.processes starts real
server processes for tests and simulations).
"""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fedge.privacy.dpf import KeyBatch
from fedge.privacy.pir import (
    PIRServer,
    TableSpec,
    default_device,
    query,
    reconstruct,
    row_indices,
    warm_up,
)

SERVICE = "fedge.pir.PIR"
FRAME_VERSION = 1
REQUEST_HEADER = struct.Struct("<4sBII")  # b"PIRQ", version, key count, key length
RESPONSE_HEADER = struct.Struct("<4sBII16s")  # b"PIRA", version, count, words, table digest
MAX_MESSAGE = 256 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def table_digest(table: np.ndarray) -> str:
    """SHA-256 over dtype, shape and bytes: equal digests mean the same table."""
    h = hashlib.sha256(f"{table.dtype.str}{table.shape}".encode())
    h.update(np.ascontiguousarray(table).data.cast("B"))
    return h.hexdigest()


def encode_request(keys: Sequence[bytes]) -> bytes:
    """One Answer request frame: the header, then the keys (all of one length) back to back."""
    if not keys or len({len(k) for k in keys}) != 1:
        raise ValueError("a request needs one or more keys of equal length")
    return REQUEST_HEADER.pack(b"PIRQ", FRAME_VERSION, len(keys), len(keys[0])) + b"".join(keys)


def decode_request(data: bytes) -> list[bytes]:
    """The keys of an Answer request frame; ValueError names what is wrong with a bad frame."""
    if len(data) < REQUEST_HEADER.size:
        raise ValueError(
            f"request of {len(data)} bytes is shorter than its {REQUEST_HEADER.size}-byte header"
        )
    magic, version, count, key_len = REQUEST_HEADER.unpack_from(data)
    if magic != b"PIRQ" or version != FRAME_VERSION:
        raise ValueError(f"not a PIR request (magic {magic!r}, version {version})")
    if count == 0 or len(data) != REQUEST_HEADER.size + count * key_len:
        raise ValueError(
            f"request announces {count} keys of {key_len} bytes but carries "
            f"{len(data) - REQUEST_HEADER.size} bytes"
        )
    body = memoryview(data)[REQUEST_HEADER.size :]
    return [bytes(body[i * key_len : (i + 1) * key_len]) for i in range(count)]


class _Batcher:
    """Coalesces concurrent requests: whatever arrived while the last pass ran is answered by
    the next single pass over the table, so many one-query clients get batch throughput."""

    def __init__(self, server: PIRServer, max_keys: int = 1024):
        self.server, self.max_keys = server, max_keys
        self.queue: list[tuple[KeyBatch, dict]] = []
        self.ready = threading.Condition()
        threading.Thread(target=self._run, name="pir-batcher", daemon=True).start()

    def answer(self, keys: list[bytes]) -> np.ndarray:
        batch = self.server.check(keys)  # a malformed request fails alone, before it joins
        slot: dict = {"done": threading.Event()}
        with self.ready:
            self.queue.append((batch, slot))
            self.ready.notify()
        slot["done"].wait()
        if "error" in slot:
            raise slot["error"]
        return slot["answers"]

    def _run(self) -> None:
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.queue)
                take: list[tuple[KeyBatch, dict]] = []
                count = 0
                while self.queue and (not take or count + len(self.queue[0][0]) <= self.max_keys):
                    take.append(self.queue.pop(0))
                    count += len(take[-1][0])
            try:
                answers = self.server.answer(KeyBatch.concat([b for b, _ in take]))
                lo = 0
                for batch, slot in take:
                    slot["answers"], lo = answers[lo : lo + len(batch)], lo + len(batch)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for _, slot in take:
                    slot["error"] = exc
            for _, slot in take:
                slot["done"].set()


class _Handler:
    """The RPC bodies: argument errors become INVALID_ARGUMENT with the reason."""

    def __init__(self, table: np.ndarray, party: int):
        server = PIRServer(table, party=party, device=default_device())
        self.spec = server.spec
        self.batcher = _Batcher(server)
        self.digest = table_digest(table)
        self.info = json.dumps(
            {
                "party": party,
                "rows": self.spec.num_rows,
                "dtype": table.dtype.str,
                "row_shape": list(self.spec.row_shape),
                "sha256": self.digest,
                "domain_bits": self.spec.domain_bits,
            }
        ).encode()

    def get_info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self.info

    def answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            answers = self.batcher.answer(decode_request(request))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed query: {exc}")
        head = RESPONSE_HEADER.pack(
            b"PIRA", FRAME_VERSION, *answers.shape, bytes.fromhex(self.digest)[:16]
        )
        return head + answers.tobytes()


def serve(
    table_path: str,
    party: int,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve FILE.npy as PIR party 0 or 1 until SIGTERM/SIGINT; blocks. Answers on a CUDA GPU
    when torch sees one (FEDGE_PIR_DEVICE=cpu forces the CPU kernel), else on the CPU.

    Prints one line `pir-server party P listening on HOST:PORT rows=N width=B sha=...` once
    listening (port 0 picks a free port; `ready` also receives it)."""
    if party not in (0, 1):
        raise ValueError(f"party must be 0 or 1, got {party}")
    path = Path(table_path)
    if path.suffix != ".npy" or not path.is_file():
        raise ValueError(f"--table must be an existing .npy file, got {table_path!r}")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # numpy's own advice (load pickles) does not apply
        raise ValueError(
            f"--table {path}: not a numpy .npy array; save the table with numpy.save"
        ) from None
    handler = _Handler(table, party)  # the server keeps its layout
    warm_up()  # compile before announcing: a first query must not time out on compilation
    # no SO_REUSEPORT (gRPC's default): a second server on a busy port must fail, not share it
    options = [*_OPTIONS, ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    methods = {
        "Info": grpc.unary_unary_rpc_method_handler(handler.get_info),
        "Answer": grpc.unary_unary_rpc_method_handler(handler.answer),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (port in use or address invalid)")
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    server.start()
    spec = handler.spec
    print(
        f"pir-server party {party} listening on {host}:{bound} rows={spec.num_rows} "
        f"width={spec.row_bytes} sha={handler.digest[:16]}",
        flush=True,
    )
    if ready is not None:
        ready(bound)
    try:
        if in_main:
            stop.wait()
        else:  # signals reach only the main thread; a served thread lives as long as the process
            server.wait_for_termination()
    finally:
        server.stop(grace=1.0).wait()
        for sig, old in previous.items():
            signal.signal(sig, old)


class PrivateEmbeddingClient:
    """Fetch rows from two non-colluding PIR servers without revealing which rows.

    addresses: ["HOST:PORT" of party 0, "HOST:PORT" of party 1]. The constructor asks both for
    their table's description and refuses servers that are down, swapped or hold different
    tables. `fetch(ids)` returns the rows as a numpy array of shape (len(ids), *row_shape)."""

    def __init__(self, addresses: Sequence[str], timeout: float = 10.0, max_batch: int = 512):
        if isinstance(addresses, str) or len(addresses) != 2:
            raise ValueError(
                f"need exactly two server addresses [party 0, party 1], got {addresses}"
            )
        self.addresses = list(addresses)
        self.timeout = timeout
        self.max_batch = max_batch
        self.queries = self.bytes_sent = self.bytes_received = 0  # traffic, both servers
        self._channels = [grpc.insecure_channel(a, options=_OPTIONS) for a in self.addresses]
        try:
            self.spec, self.digest = self._connect()
        except Exception:
            self.close()
            raise

    def _connect(self) -> tuple[TableSpec, bytes]:
        """Both servers' table descriptions, checked against each other."""
        infos = [json.loads(self._call(i, "Info", b"")) for i in range(2)]
        for i, info in enumerate(infos):
            if info["party"] != i:
                raise ValueError(
                    f"server {self.addresses[i]} is party {info['party']}, listed as party {i}: "
                    "give the party-0 server first"
                )
        keys = ("rows", "dtype", "row_shape", "sha256")
        if any(infos[0][k] != infos[1][k] for k in keys):
            a, b = ({k: info[k] for k in keys} for info in infos)
            raise ValueError(
                f"table mismatch: {self.addresses[0]} serves {a}, {self.addresses[1]} serves {b}"
            )
        info = infos[0]
        spec = TableSpec(info["rows"], np.dtype(info["dtype"]), tuple(info["row_shape"]))
        return spec, bytes.fromhex(info["sha256"])[:16]

    def _call(self, i: int, method: str, payload: bytes) -> bytes:
        stub = self._channels[i].unary_unary(f"/{SERVICE}/{method}")
        try:
            return stub(payload, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise self._error(i, exc) from exc

    def _error(self, i: int, exc: grpc.RpcError) -> Exception:
        addr, code = self.addresses[i], exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ConnectionError(
                f"PIR server {addr} did not answer within {self.timeout:g} s ({code.name}); "
                "is it running?"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"PIR server {addr} rejected the query: {exc.details()}")
        return RuntimeError(f"PIR server {addr} failed: {code.name} {exc.details()}")

    def _answers(self, keys_a: list[bytes], keys_b: list[bytes]) -> list[np.ndarray]:
        pending = []
        for i, keys in enumerate((keys_a, keys_b)):
            stub = self._channels[i].unary_unary(f"/{SERVICE}/Answer")
            request = encode_request(keys)
            self.bytes_sent += len(request)
            pending.append(stub.future(request, timeout=self.timeout))
        out = []
        for i, fut in enumerate(pending):
            try:
                data = fut.result()
            except grpc.RpcError as exc:
                raise self._error(i, exc) from exc
            self.bytes_received += len(data)
            head = (
                RESPONSE_HEADER.unpack_from(data)
                if len(data) >= RESPONSE_HEADER.size
                else (b"", 0, 0, 0, b"")
            )
            magic, _, count, words, digest = head
            size = RESPONSE_HEADER.size + count * words * 8
            if magic != b"PIRA" or (count, words, len(data)) != (
                len(keys_a),
                self.spec.words,
                size,
            ):
                raise ValueError(f"PIR server {self.addresses[i]} sent a malformed answer")
            if digest != self.digest:
                raise ValueError(f"PIR server {self.addresses[i]} changed its table since connect")
            out.append(
                np.frombuffer(data, np.uint64, count * words, RESPONSE_HEADER.size).reshape(
                    count, -1
                )
            )
        return out

    def fetch(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows `ids` of the servers' table; neither server learns which."""
        idx = row_indices(ids)
        if idx.size == 0:
            return np.empty((0, *self.spec.row_shape), self.spec.dtype)
        parts = []
        for lo in range(0, idx.size, self.max_batch):
            keys_a, keys_b = query(idx[lo : lo + self.max_batch], self.spec.num_rows)
            self.queries += len(keys_a)
            answers_a, answers_b = self._answers(keys_a, keys_b)
            parts.append(reconstruct(answers_a, answers_b, self.spec))
        return np.concatenate(parts)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> PrivateEmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
