"""Every touch of Flower internals fedge needs, in one place, each covered by `self_test()`.

fedge's own Grids run Flower's ServerApp code without a SuperLink, so they must do what
Flower's SuperLink does and does not expose publicly: give the server process a task
identity (run id, the SuperLink's node id) so that `Message(...)` can be built, and stamp
each instruction with a message id. fedge's strategies use Flower's weighted aggregation of
ArrayRecords (SCAFFOLD), its RDP accountant and the config key its client-side DP wrapper
sends (differential privacy), and the key pairs its legacy SecAgg+ makes (secure aggregation).

fedge's edge runtime (`fedge.edge`) is a long-lived ClientApp process beside a SuperNode
started with `--isolation process`. It speaks the SuperNode's Runtime API the way
Flower's SuperExec and `flwr-clientapp` do (acquire a task, pull its input, push the
reply and the task's output), with Flower's own client and functions; it removes the
SuperNode's fixed sleeps (3 s when no message came, 0.5 s while waiting for a reply) and
Flower's 1 s first retry of an object not uploaded yet; the SuperLink reports the devices
it refuses and keeps messages' objects (model arrays in flight) in memory while its state
(runs, nodes, enrolled keys) stays in its database.

`fedge run --app DIR --backend flower` runs a Flower App folder on Flower's own simulation
the way `flwr run` does, which Flower's public `run_simulation` cannot (it gives the app an
empty run config).

None of these is in Flower's public API; a Flower upgrade that moves one breaks
`self_test()` here, loudly, and nowhere else.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import (
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    TASK_ID_NUM_BYTES,
    ErrorCode,
    SubStatus,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

__all__ = [
    "KEY_CLIPPING_NORM",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "NeighboringRelation",
    "PrivacyConfig",
    "RdpAccountant",
    "Run",
    "RuntimeTask",
    "SamplingMethod",
    "SubStatus",
    "acquire_clientapp_task",
    "aggregate_arrayrecords",
    "assign_message_id",
    "bare_context",
    "bytes_to_public_key",
    "claim_server_identity",
    "empty_run",
    "error_reply",
    "flower_app_simulation",
    "generate_key_pairs",
    "keep_objects_in_memory",
    "load_client_app",
    "message_bytes",
    "message_from_bytes",
    "patch_object_pulls",
    "patch_supernode_sleeps",
    "public_key_to_bytes",
    "report_refused_nodes",
    "runtime_client",
    "self_test",
    "set_message_id",
]


def claim_server_identity(run_id: int) -> None:
    """Act as the SuperLink-side ServerApp task of `run_id` in this process."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def empty_run(run_id: int) -> Run:
    """The `Run` a Grid reports for a run fedge started without a SuperLink."""
    return Run.create_empty(run_id)


def assign_message_id(message: Message) -> str:
    """Give an instruction message a fresh id, as Flower's grids do on push."""
    message_id = uuid.uuid4().hex
    set_message_id(message, message_id)
    return message_id


def set_message_id(message: Message, message_id: str) -> None:
    """Stamp `message` with `message_id` (a Ray actor rebuilds the driver's instruction)."""
    message.metadata.__dict__["_message_id"] = message_id


def error_reply(
    message: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    """A reply carrying an error instead of content, as Flower's SuperNode sends."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def runtime_client(address: str, token: str | None = None) -> Any:
    """A client of the SuperNode's Runtime API at `address` (plain HTTP on loopback), as
    Flower's SuperExec (no token) or a `flwr-clientapp` (its task's token) builds it."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    retry = make_simple_http_retry_invoker()
    retry.max_time = 120.0  # a SuperNode gone for two minutes fails the task, not the runtime
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def acquire_clientapp_task(client: Any) -> tuple[int, str] | None:
    """Claim the SuperNode's oldest pending ClientApp task: (run id, token), or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    if res.HasField("task") and res.token:
        return int(res.task.run_id), str(res.token)
    return None


class RuntimeTask:
    """One claimed ClientApp task on the SuperNode's Runtime API, as `flwr-clientapp`
    handles it: pull the message and context, push the reply and the context back, and
    keep the task alive with heartbeats meanwhile."""

    def __init__(self, address: str, token: str) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender

        self.client = runtime_client(address, token)
        request = SendTaskHeartbeatRequest()

        def beat() -> bool:  # Flower's own sends SIGINT on a refused beat; a runtime must not
            try:
                return bool(self.client.SendTaskHeartbeat(request).success)
            except Exception:  # noqa: BLE001 - a missed beat is retried with backoff
                return False

        self.heartbeat = HeartbeatSender(beat)
        self.heartbeat.start()

    def pull(self) -> tuple[Message, Context, Any, Any]:
        """The task's message, its node's context, its run and its FAB."""
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        return pull_task_input(self.client)

    def push(
        self,
        reply: Message | None,
        context: Context | None,
        details: str = "",
        save_context: bool = True,
    ) -> None:
        """Send the reply (if any) and finish the task (failed if `details` says why),
        saving `context` as the node's context of the run unless told not to."""
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        try:
            if reply is not None and context is not None:
                push_message(self.client, reply, context)
            status = SubStatus.FAILED if details else SubStatus.COMPLETED
            push_task_output(self.client, context if save_context else None, status, details)
        finally:
            self.heartbeat.stop()
            self.client.close()


def bare_context(message: Message) -> Context:
    """A context naming only the run and node of `message` (enough to push a reply)."""

    return Context(message.metadata.run_id, message.metadata.dst_node_id, {}, RecordDict(), {})


def message_bytes(message: Message) -> bytes:
    """A message's metadata (no content) as bytes: enough to answer it later."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    return message_to_proto(remove_content_from_message(message)).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """The message `message_bytes` wrote (content-less), with its message id."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def load_client_app(fab: Any, run: Any) -> Any:
    """Install the run's FAB (unpacked, hash-checked) and load its ClientApp, as
    `flwr-clientapp` does for every message; the runtime does it once per run."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab.content, skip_prompt=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(run.fab_id, run.fab_version, fab.hash_str)


def flower_app_simulation(
    app_dir: Path,
    components: tuple[str, str],
    num_supernodes: int,
    overrides: dict[str, Any],
    run_config: dict[str, Any],
    client_resources: dict[str, float],
) -> None:
    """Flower's own simulation of a Flower App folder, as the `flwr-simulation` process of
    `flwr run` starts it: the components (serverapp, clientapp) by reference from the app's
    folder, a Run carrying the `overrides` (each ClientApp fuses them with the app's
    defaults) and the ServerApp's Context with the fused `run_config`. Flower's public
    `run_simulation` takes app objects and gives their Contexts an empty run config."""
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id)
    run.override_config = dict(overrides)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    claim_server_identity(run_id)
    context = Context(run_id, 0, {}, RecordDict(), dict(run_config))
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app_attr=components[0],
        client_app_attr=components[1],
        backend_config={"client_resources": dict(client_resources)},
        app_dir=str(app_dir),
        run=run,
        server_app_context=context,
        is_app=True,
    )


# The SuperNode's fixed sleeps (Flower 1.42, flwr/supernode/start_client_internal.py):
# 3 s after a pull that brought no message, 0.5 s between looks for the ClientApp's reply
# (and for a reply object's content).
SUPERNODE_IDLE_SLEEP = 3
SUPERNODE_REPLY_SLEEP = 0.5


def patch_supernode_sleeps(
    idle_wait: Callable[[], None], on_message: Callable[[], None], reply_poll: float
) -> None:
    """Replace the SuperNode's fixed sleeps in this process: `idle_wait()` instead of the
    3 s idle sleep, `on_message()` after each message pulled, `reply_poll` seconds
    between looks for a reply. Call before `flower_supernode()`."""
    import flwr.supernode.start_client_internal as sci

    def sleep(seconds: float) -> None:
        if seconds == SUPERNODE_IDLE_SLEEP:
            idle_wait()
        elif seconds == SUPERNODE_REPLY_SLEEP:
            time.sleep(reply_poll)
        else:
            time.sleep(seconds)

    pull = sci._pull_and_store_message

    def pull_and_store(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            on_message()
        return run_id

    setattr(sci, "time", types.SimpleNamespace(sleep=sleep, time=time.time))  # noqa: B010
    setattr(sci, "_pull_and_store_message", pull_and_store)  # noqa: B010


# Flower waits 1 s for an object that is not there yet (a message is registered before its
# objects are uploaded), doubling up to 10 s; each of these modules pulls through one name.
OBJECT_PULLERS = {
    "flwr.superlink.grid.http_grid": "pull_objects",  # the ServerApp pulling replies
    "flwr.supernode.start_client_internal": "pull_objects",  # the SuperNode pulling messages
    "flwr.supernode.runtime.run_clientapp": "pull_and_inflate_object_from_tree",  # a ClientApp
}


def patch_object_pulls(module: str, initial: float = 0.005, cap: float = 0.1) -> None:
    """In `module` (a key of OBJECT_PULLERS), retry a missing object after `initial`
    seconds, doubling up to `cap`, instead of Flower's 1 s doubling to 10 s."""
    import importlib

    from flwr.supercore.inflatable import inflatable_utils

    name = OBJECT_PULLERS[module]
    pull = functools.partial(getattr(inflatable_utils, name), initial_backoff=initial)
    setattr(importlib.import_module(module), name, functools.partial(pull, backoff_cap=cap))


def report_refused_nodes(report: Callable[[str], None]) -> None:
    """In this SuperLink process, call `report(why)` whenever a SuperNode is refused at
    activation (with SuperNode authentication on: its key is not enrolled). Flower says so
    only to the SuperNode. Call before `flower_superlink()`."""
    import hashlib

    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.servicer.fleet import fleet_handlers

    activate = fleet_handlers.activate_node

    def activate_node(request: Any, state: Any) -> Any:
        try:
            return activate(request=request, state=state)
        except FlowerError as exc:
            if exc.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
                key = hashlib.sha256(bytes(request.public_key)).hexdigest()[:16]
                report(f"refused a device whose key is not enrolled (key sha256 {key}...)")
            raise

    fleet_handlers.activate_node = activate_node


def keep_objects_in_memory() -> None:
    """In this SuperLink process, keep the ObjectStore (the arrays of messages in flight) in
    memory and only the LinkState in `--database`. Flower puts both in the database: every
    object a message is split into (two per array) is then an SQL insert, select and delete
    behind an HTTP request, the bulk of a deployed round's requests. The objects live only
    until their message is delivered; a restarted SuperLink starts a new run anyway. Call
    before `flower_superlink()`."""
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    factories = superlink_main.get_objectstore_linkstate_factories

    def in_memory_objects(database: str, federation_manager: Any) -> tuple[Any, Any]:
        if database.strip().lower().partition("://")[0] not in ("", "sqlite"):
            return factories(database, federation_manager)  # another backend: Flower's way
        objects = ObjectStoreFactory()  # Flower's in-memory store
        return objects, LinkStateFactory(database, federation_manager, objects)

    setattr(superlink_main, "get_objectstore_linkstate_factories", in_memory_objects)  # noqa: B010


def _check_object_store_split() -> None:
    """The SuperLink still builds its stores through the function fedge replaces, and a
    LinkState still takes its ObjectStore from the factory it is given."""
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    source = Path(inspect.getsourcefile(superlink_main) or "").read_text()
    if "= get_objectstore_linkstate_factories(" not in source:
        raise RuntimeError("the SuperLink no longer builds its stores as fedge expects")
    params = list(inspect.signature(LinkStateFactory).parameters)
    if params[:3] != ["database", "federation_manager", "objectstore_factory"]:
        raise RuntimeError(f"LinkStateFactory changed its parameters: {params}")
    if not callable(getattr(ObjectStoreFactory(), "store", None)):
        raise RuntimeError("ObjectStoreFactory has no store()")


def _check_refusal_hook() -> None:
    """The SuperLink's router still activates nodes through the handler fedge wraps."""
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.routers.fleet import router

    source = Path(inspect.getsourcefile(router) or "").read_text()
    if "fleet_handlers.activate_node(" not in source:
        raise RuntimeError("the SuperLink no longer activates nodes via fleet_handlers")
    if not hasattr(FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED, "m"), "code"):
        raise RuntimeError("FlowerError lost its code")


def _check_object_pulls() -> None:
    """Each puller still pulls through the name, with the backoff parameters, fedge patches."""
    import importlib

    from flwr.supercore.inflatable import inflatable_utils

    for module, name in OBJECT_PULLERS.items():
        params = inspect.signature(getattr(inflatable_utils, name)).parameters
        if not {"initial_backoff", "backoff_cap"} <= set(params):
            raise RuntimeError(f"Flower's {name} lost its backoff parameters")
        source = Path(inspect.getsourcefile(importlib.import_module(module)) or "").read_text()
        if f"{name}(" not in source:
            raise RuntimeError(f"{module} no longer pulls objects through {name}")


def _check_supernode_sleeps() -> None:
    """The SuperNode still sleeps where and as long as `patch_supernode_sleeps` expects."""
    import flwr.supernode.start_client_internal as sci

    source = Path(inspect.getsourcefile(sci) or "").read_text()
    calls = {
        f"time.sleep({SUPERNODE_IDLE_SLEEP})": 1,
        f"time.sleep({SUPERNODE_REPLY_SLEEP})": 2,
    }
    for call, count in calls.items():
        if source.count(call) != count:
            raise RuntimeError(f"the SuperNode no longer calls {call} {count} time(s)")
    if "time.sleep(" in source.replace("time.sleep(3)", "").replace("time.sleep(0.5)", ""):
        raise RuntimeError("the SuperNode sleeps somewhere fedge does not know of")
    if set(re.findall(r"\btime\.(\w+)", source)) - {"sleep", "time"}:
        raise RuntimeError("the SuperNode uses more of `time` than fedge's stand-in offers")
    if not callable(getattr(sci, "_pull_and_store_message", None)):
        raise RuntimeError("the SuperNode's _pull_and_store_message is gone")
    if "run_id = _pull_and_store_message(" not in source:
        raise RuntimeError("the SuperNode no longer pulls through _pull_and_store_message")


def _check_app_simulation() -> None:
    """`flower_app_simulation` passes these to Flower's simulation entry point."""
    from flwr.simulation.run_simulation import _run_simulation

    wanted = {"server_app_attr", "client_app_attr", "app_dir", "run", "server_app_context"}
    missing = wanted - set(inspect.signature(_run_simulation).parameters)
    if missing:
        raise RuntimeError(f"Flower's _run_simulation lost {sorted(missing)}")


def _check_runtime_api() -> None:
    """Every Runtime API piece the edge runtime uses is still there, with its shape."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supernode.runtime import run_clientapp

    for name in ("pull_task_input", "push_message", "push_task_output"):
        if not callable(getattr(run_clientapp, name, None)):
            raise RuntimeError(f"flwr-clientapp's {name} is gone")
    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    client = runtime_client("127.0.0.1:9", token="t" * 8)
    for method in ("AcquireTask", "SendTaskHeartbeat", "PullTaskInput", "PushTaskOutput"):
        if not callable(getattr(client, method, None)):
            raise RuntimeError(f"the Runtime API client has no {method}")
    client.close()
    params = inspect.signature(run_clientapp.push_task_output).parameters
    if list(params)[:4] != ["client", "context", "sub_status", "details"]:
        raise RuntimeError("flwr-clientapp's push_task_output changed its parameters")


def self_test() -> None:
    """Raise RuntimeError if this Flower no longer supports what fedge relies on."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    try:
        _check_supernode_sleeps()
        _check_object_pulls()
        _check_refusal_hook()
        _check_object_store_split()
        _check_runtime_api()
        _check_app_simulation()
        claim_server_identity(run_id=7)
        msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), 2, "train")
        mid = assign_message_id(msg)
        reply = Message(RecordDict(), reply_to=msg)
        ids_ok = (
            empty_run(7).run_id == 7
            and msg.metadata.message_id == mid
            and msg.metadata.run_id == 7
            and reply.metadata.reply_to_message_id == mid
            and reply.metadata.src_node_id == 2
            and message_from_bytes(message_bytes(msg)).metadata.message_id == mid
        )
        records = [
            RecordDict({"a": ArrayRecord([np.full(2, v)]), "m": MetricRecord({"n": n})})
            for v, n in ((1.0, 1), (4.0, 2))
        ]
        mean = aggregate_arrayrecords(records, "n").to_numpy_ndarrays()[0]
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=1e-5,
                population_size=10,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        dp = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(), 1.0, 0.5, 2, accountant=accountant
        )
        nodes = cast(Grid, _Nodes())
        sent = next(iter(dp.configure_train(1, ArrayRecord([np.zeros(2)]), ConfigRecord(), nodes)))
        dp_ok = sent.content.config_records["config"][KEY_CLIPPING_NORM] == 0.5
    except Exception as exc:  # any failure means the internals moved
        raise RuntimeError(f"fedge's Flower compatibility layer is broken: {exc!r}") from exc
    if not ids_ok:
        raise RuntimeError("fedge's Flower compatibility layer is broken: metadata not as expected")
    if not np.allclose(mean, 3.0):
        raise RuntimeError(f"Flower's aggregate_arrayrecords no longer weights: {mean}")
    if not dp_ok:
        raise RuntimeError(f"Flower's client-side DP no longer sends {KEY_CLIPPING_NORM!r}")


class _Nodes:
    """The least of a Grid that a strategy's configure_train asks for (self_test only)."""

    def get_node_ids(self) -> list[int]:
        return [2, 3]

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)
