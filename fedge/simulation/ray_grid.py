"""RayGrid: Flower's Grid contract served by a pool of Ray actors, without polling.

Flower's own simulation polls every virtual node and sends one message (and its Context)
per Ray call, so its rounds slow down with the population. Here the driver knows whom it
sampled: it sends each round's shared content to the object store once, cuts the round's
messages into small batches and hands a batch to whichever actor is free (dynamic
dispatch, so slow clients do not idle the pool). A round costs time in proportion to the
clients sampled, not the population.

Node state (`Context.state`: control variates, optimizer state) does not live in actors:
it travels with each batch and comes back with the replies, into a driver-side store with
a memory bound beyond which it spills to disk. An actor that dies loses nothing but the
replies in flight, which become error replies; the actor is replaced.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from flwr.app import Context, Message, RecordDict, UserConfig
from ray._private import ray_constants

from fedge.compat import (
    ErrorCode,
    assign_message_id,
    claim_server_identity,
    error_reply,
    set_message_id,
)
from fedge.errors import ConfigError
from fedge.plugins import load_object
from fedge.simulation.local_grid import (
    NODE_ID_BASE,
    VirtualGrid,
    array_bytes,
    call_client_app,
    node_config,
)

log = logging.getLogger("fedge")
DEFAULT_CLIENT_APP = "fedge.client.app:app"
# Memory on a Ray instance that fedge starts. Every page of the shared-memory object store
# that a process touched stays in its resident set, and Ray frees dead objects in batches
# (once a second), so the store kept handing out fresh pages: each 4 MB reply stayed
# resident in the actor that wrote it and in the driver, above Flower's run_simulation.
# Freed at once, objects leave their pages to the next ones. And Ray starts one idle worker
# per CPU for the driver ahead of time; RayGrid uses only its actors (0.14 GiB saved on 2 CPUs).
MEMORY_CONFIG = {"free_objects_period_milliseconds": 0, "prestart_worker_first_driver": False}
# About this much reply content per actor call (at least one message). Measured with a 4 MB
# model on 2 cores: 32 MB batches kept the speed of 52 MB ones for 0.25 GiB less memory;
# 16-24 MB batches cost 18-28% more CPU.
BATCH_BYTES = 32 << 20


class NodeStateStore:
    """Pickled `Context.state` per node: in memory up to `memory_bytes`, then on disk."""

    def __init__(self, memory_bytes: int = 256 << 20, spill_dir: str | Path | None = None) -> None:
        self.memory_bytes = memory_bytes
        self._mem: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._mem_size = 0
        self._spill_dir = Path(spill_dir) if spill_dir else None
        self._on_disk: set[int] = set()

    def _path(self, node_id: int) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="fedge-node-state-"))
        return self._spill_dir / f"{node_id}.pkl"

    def get(self, node_id: int) -> bytes | None:
        if node_id in self._mem:
            self._mem.move_to_end(node_id)
            return self._mem[node_id]
        if node_id in self._on_disk:
            return self._path(node_id).read_bytes()
        return None

    def put(self, node_id: int, blob: bytes) -> None:
        if node_id in self._mem:
            self._mem_size -= len(self._mem.pop(node_id))
        self._on_disk.discard(node_id)
        self._mem[node_id] = blob
        self._mem_size += len(blob)
        while self._mem_size > self.memory_bytes and len(self._mem) > 1:
            old_id, old = self._mem.popitem(last=False)
            self._mem_size -= len(old)
            self._path(old_id).write_bytes(old)
            self._on_disk.add(old_id)

    @property
    def spilled(self) -> int:
        """Nodes whose state currently lives on disk."""
        return len(self._on_disk)


@dataclass(frozen=True)
class WorkItem:
    """One instruction, minus its content (which travels once per batch)."""

    message_id: str
    dst_node_id: int
    message_type: str
    group_id: str
    ttl: float
    state: bytes | None


@ray.remote
class ClientWorker:
    """Runs the ClientApp for batches of virtual nodes; keeps nothing between batches but
    the round's shared content."""

    def __init__(
        self,
        app_spec: str,
        run_id: int,
        num_nodes: int,
        threads: int,
        app_dir: str | None,
        run_config: UserConfig,
    ) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        self.app = load_object(app_spec, search_path=app_dir)
        if "torch" in sys.modules:  # only if the app uses it: importing torch costs ~300 MB
            sys.modules["torch"].set_num_threads(max(1, threads))
        self.run_id = run_id
        self.num_nodes = num_nodes
        self.run_config = run_config
        self.content_id, self.content = "", RecordDict()
        claim_server_identity(run_id)  # to rebuild the instruction messages here

    def ready(self) -> bool:
        return True

    def round_content(self, boxed: list[Any]) -> RecordDict:
        """The round's shared content, fetched and unpickled once per actor, not per batch.
        The clients an actor serves share it: ClientApps read a message, never write it."""
        ref = boxed[0]  # boxed, so that Ray hands over the reference, not the object
        if self.content_id != ref.hex():
            del self.content  # drop the last round's copy before fetching this one
            self.content = ray.get(ref)
            self.content_id = ref.hex()
        return self.content

    def run(self, boxed: list[Any], items: list[WorkItem]) -> list[tuple[Message, bytes | None]]:
        content = self.round_content(boxed)
        out = []
        for item in items:
            msg = Message(
                content, item.dst_node_id, item.message_type, ttl=item.ttl, group_id=item.group_id
            )
            set_message_id(msg, item.message_id)
            state = pickle.loads(item.state) if item.state else RecordDict()
            pid = item.dst_node_id - NODE_ID_BASE
            ctx = Context(
                self.run_id,
                item.dst_node_id,
                node_config(pid, self.num_nodes),
                state,
                dict(self.run_config),
            )
            reply = call_client_app(self.app, msg, ctx)
            new_state = pickle.dumps(ctx.state) if len(ctx.state) else None
            out.append((reply, new_state))
        return out


class RayGrid(VirtualGrid):
    """A Grid of `num_nodes` virtual nodes served by Ray actors.

    client_cpus / client_gpus: resources one client needs (fractions allowed); the pool
    has as many actors as the cluster fits. dropout_rate: probability that a sampled
    client fails (simulated device loss). batch_size: messages per actor call (0: chosen
    so each actor gets about four batches a round). app_spec names the ClientApp, imported
    from `app_dir` first if given (a Flower App's folder); every node's Context carries
    `run_config`.
    """

    def __init__(
        self,
        num_nodes: int,
        app_spec: str = DEFAULT_CLIENT_APP,
        client_cpus: float = 1.0,
        client_gpus: float = 0.0,
        num_actors: int = 0,
        dropout_rate: float = 0.0,
        batch_size: int = 0,
        state_memory_bytes: int = 256 << 20,
        seed: int = 0,
        run_id: int = 1,
        app_dir: str | None = None,
        run_config: UserConfig | None = None,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError(
                "call fedge.simulation.ray_grid.init_ray() before building a RayGrid"
            )
        super().__init__(num_nodes, run_id)
        self.app_spec = app_spec
        self.app_dir = app_dir
        self.run_config = run_config or {}
        self.client_cpus = client_cpus
        self.client_gpus = client_gpus
        self.dropout_rate = dropout_rate
        self.batch_size = batch_size
        self.states = NodeStateStore(state_memory_bytes)
        self.rng = np.random.default_rng(seed)
        self.num_actors = num_actors or self._fit_actors()
        self.actors = [self._new_actor() for _ in range(self.num_actors)]
        ray.get([a.ready.remote() for a in self.actors])

    def _fit_actors(self) -> int:
        resources = ray.cluster_resources()
        for name, need in (("CPU", self.client_cpus), ("GPU", self.client_gpus)):
            have = resources.get(name, 0)
            if need > have:  # Ray would wait for such a worker forever
                flag = f"--client-{name.lower()}s"
                raise ConfigError(
                    f"{flag.removeprefix('--').replace('-', '_')}: each client asks for {need:g} "
                    f"{name}(s) but the Ray cluster has {have:g}; lower {flag} or add resources"
                )
        fits = []
        if self.client_cpus > 0:
            fits.append(resources.get("CPU", 1) / self.client_cpus)
        if self.client_gpus > 0:
            fits.append(resources.get("GPU", 0) / self.client_gpus)
        return max(1, int(min(fits)) if fits else os.cpu_count() or 1)

    def _new_actor(self) -> Any:
        options = {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus}
        worker: Any = ClientWorker  # a Ray actor class: `options` and `remote` are Ray's
        return worker.options(**options).remote(
            self.app_spec,
            self.run_id,
            self.num_nodes,
            int(max(1, self.client_cpus)),
            self.app_dir,
            self.run_config,
        )

    # --- Grid's interface -----------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("RayGrid answers whole rounds: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("RayGrid answers whole rounds: use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run a round: every message gets exactly one reply (content, or an error)."""
        deadline = time.monotonic() + timeout if timeout else float("inf")
        messages = list(messages)
        for msg in messages:
            self.partition_of(msg.metadata.dst_node_id)
            assign_message_id(msg)
        replies: dict[str, Message] = {}
        live = []
        for msg in messages:
            if self.dropout_rate and self.rng.random() < self.dropout_rate:
                replies[msg.metadata.message_id] = error_reply(
                    msg, "client dropped out (simulated)", ErrorCode.NODE_UNAVAILABLE
                )
            else:
                live.append(msg)
        replies.update(self._dispatch(live, deadline))
        return [replies[m.metadata.message_id] for m in messages]

    # --- dispatch -------------------------------------------------------------------
    def _batches(self, messages: list[Message]) -> list[tuple[Any, list[Message]]]:
        """Group by shared content (one object-store put each), then cut into batches."""
        groups: dict[int, tuple[RecordDict, list[Message]]] = {}
        for msg in messages:
            groups.setdefault(id(msg.content), (msg.content, []))[1].append(msg)
        even = max(1, -(-len(messages) // (4 * self.num_actors)))
        batches = []
        for content, msgs in groups.values():
            size = self.batch_size or max(1, min(even, BATCH_BYTES // max(1, array_bytes(content))))
            ref = ray.put(content)
            batches += [(ref, msgs[i : i + size]) for i in range(0, len(msgs), size)]
        return batches

    def _submit(self, actor: Any, ref: Any, msgs: list[Message]) -> Any:
        items = [
            WorkItem(
                m.metadata.message_id,
                m.metadata.dst_node_id,
                m.metadata.message_type,
                m.metadata.group_id,
                m.metadata.ttl,
                self.states.get(m.metadata.dst_node_id),
            )
            for m in msgs
        ]
        return actor.run.remote([ref], items)

    def _dispatch(self, messages: list[Message], deadline: float) -> dict[str, Message]:
        pending = collections.deque(self._batches(messages))
        idle = list(self.actors)
        running: dict[Any, tuple[Any, list[Message]]] = {}
        replies: dict[str, Message] = {}
        while pending or running:
            while pending and idle:
                actor = idle.pop()
                ref, msgs = pending.popleft()
                running[self._submit(actor, ref, msgs)] = (actor, msgs)
            wait = deadline - time.monotonic()
            done, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, min(wait, 1e6)))
            if not done and time.monotonic() >= deadline:
                self._expire(running, pending, replies)
                break
            for future in done:
                actor, msgs = running.pop(future)
                try:
                    results = ray.get(future)
                except ray.exceptions.RayActorError as exc:
                    log.warning("a client actor died (%s); replacing it", type(exc).__name__)
                    actor = self._replace(actor)
                    results = [(error_reply(m, f"client actor died: {exc}"), None) for m in msgs]
                idle.append(actor)
                for msg, (reply, state) in zip(msgs, results, strict=True):
                    replies[msg.metadata.message_id] = self._check(msg, reply)
                    if state is not None:
                        self.states.put(msg.metadata.dst_node_id, state)
        return replies

    def _replace(self, dead: Any) -> Any:
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def _expire(self, running: dict, pending: collections.deque, replies: dict) -> None:
        """The round is over: whatever has not answered gets a timeout error; late replies
        are dropped by killing the actors still busy (a sync actor cannot be interrupted,
        and a live one would keep its CPUs from its replacement)."""
        late = [m for _, msgs in running.values() for m in msgs]
        late += [m for _, msgs in pending for m in msgs]
        for msg in late:
            replies[msg.metadata.message_id] = error_reply(
                msg, "no reply within the round timeout", ErrorCode.REPLY_MESSAGE_UNAVAILABLE
            )
        for actor, _ in running.values():
            ray.kill(actor, no_restart=True)
            self._replace(actor)
        running.clear()
        pending.clear()

    @staticmethod
    def _check(msg: Message, reply: Message) -> Message:
        """FedAvg does not check who replied; the grid must."""
        md = reply.metadata
        if (
            md.reply_to_message_id != msg.metadata.message_id
            or md.src_node_id != msg.metadata.dst_node_id
        ):
            return error_reply(msg, "reply does not match its instruction")
        return reply

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start Ray on this machine, or join the cluster at `address` (or $RAY_ADDRESS).

    On a cluster, fedge and the working directory (custom tasks and strategies) travel to
    the workers through Ray's runtime environment.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep CUDA_VISIBLE_DEVICES
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        import fedge

        kwargs["runtime_env"] = {
            "py_modules": [str(Path(fedge.__file__).parent)],
            "working_dir": os.getcwd(),
            "excludes": [".venv", ".git", "runs", "*.pt", "*.npy", "__pycache__"],
        }
        ray.init(address=address, **kwargs)
    else:
        # workers import what the driver can: its own source folders (not site-packages)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(_source_paths())}}
        # Ray's ports have no authentication: a Ray that fedge starts listens on loopback
        # only. Ray turns 127.0.0.1 into the machine's address unless told this is no
        # cluster (Ray internals, read at call time; tests/faults/test_bad_input.py checks)
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # for Ray's own processes
        ray_constants.ENABLE_RAY_CLUSTER = False
        # "local": a fresh instance even when a `ray start` cluster runs on this machine
        ray.init(
            "local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _system_config=MEMORY_CONFIG,
            **kwargs,
        )


def _source_paths() -> list[str]:
    skip = (sys.base_prefix, sys.prefix)
    paths = [os.getcwd()] + [p for p in sys.path if p and not p.startswith(skip)]
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]
