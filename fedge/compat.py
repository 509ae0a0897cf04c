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
Flower's 1 s first retry of an object not uploaded yet, and holds the runtime's claim of a
task until a message has arrived whole. fedge's SuperLink reports the devices it refuses,
keeps messages' objects (model arrays in flight) in memory while its state (runs, nodes,
enrolled keys) stays in its database, holds a request for a message, a reply or an object
until it is there (instead of having SuperNodes and the ServerApp poll), and checks a run's
status once per quarter second rather than on every object.

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
from collections.abc import Callable, Hashable, Iterable
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
    "cache_run_checks",
    "claim_server_identity",
    "empty_run",
    "error_reply",
    "flower_app_simulation",
    "generate_key_pairs",
    "hold_superlink_polls",
    "hold_task_claims",
    "keep_objects_in_memory",
    "load_client_app",
    "message_bytes",
    "message_from_bytes",
    "patch_object_pulls",
    "patch_supernode_sleeps",
    "public_key_to_bytes",
    "recorddict_bytes",
    "recorddict_from_bytes",
    "report_refused_nodes",
    "runtime_client",
    "self_test",
    "set_message_id",
    "wake_on_replies",
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


def recorddict_bytes(content: RecordDict) -> bytes:
    """A whole RecordDict (every record, array bytes included) as Flower serialises it."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """The RecordDict `recorddict_bytes` wrote; bytes that are not one raise ValueError."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
    from google.protobuf.message import DecodeError

    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a serialised RecordDict ({exc})") from exc
    return recorddict_from_proto(proto)


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
    idle_wait: Callable[[], None], on_message: Callable[[], None], reply_wait: Callable[[], None]
) -> None:
    """Replace the SuperNode's fixed sleeps in this process: `idle_wait()` instead of the
    3 s idle sleep, `on_message()` after each message pulled, `reply_wait()` between looks
    for the ClientApp's reply and its objects (0.5 s each). Call before `flower_supernode()`."""
    import flwr.supernode.start_client_internal as sci

    def sleep(seconds: float) -> None:
        if seconds == SUPERNODE_IDLE_SLEEP:
            idle_wait()
        elif seconds == SUPERNODE_REPLY_SLEEP:
            reply_wait()
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


# `hold(key, call, is_empty)` answers a request, waiting while `is_empty(call())`;
# `notify(keys)` wakes the requests held for those keys (see `fedge.edge.poll.Waits`)
Hold = Callable[[Hashable, Callable[[], Any], Callable[[Any], bool]], Any]
Notify = Callable[[Iterable[Hashable]], None]
Args = tuple[tuple[Any, ...], dict[str, Any]]


def _arg(call: Args, name: str, index: int) -> Any:
    """A handler's argument, passed by keyword (the Fleet router) or by position (Runtime)."""
    args, kwargs = call
    return kwargs[name] if name in kwargs else args[index]


def _held(
    module: Any, name: str, hold: Hold, key: Callable[[Args], Hashable], empty: Callable
) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def handler(*args: Any, **kwargs: Any) -> Any:
        return hold(key((args, kwargs)), lambda: original(*args, **kwargs), empty)

    setattr(module, name, handler)


def _notifying(
    module: Any, name: str, notify: Notify, keys: Callable[[Args], Iterable[Hashable]]
) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def handler(*args: Any, **kwargs: Any) -> Any:
        answer = original(*args, **kwargs)
        notify(keys((args, kwargs)))
        return answer

    setattr(module, name, handler)


def _no_messages(answer: Any) -> bool:
    return not answer.messages_list


def _not_uploaded(answer: Any) -> bool:
    return bool(answer.object_found and not answer.object_available)


def hold_superlink_polls(hold: Hold, notify: Notify) -> None:
    """In this SuperLink process, hold a SuperNode asking for its next instruction, the
    ServerApp asking for replies, and either asking for an object not uploaded yet, until
    it arrives, instead of answering "nothing yet" (each push notifies what it brought).
    Flower's askers then poll again: every poll is an HTTP request and SQL queries here, the
    bulk of a deployed round's requests. Call before `flower_superlink()`."""
    from flwr.superlink.servicer.fleet import fleet_handlers as fleet
    from flwr.superlink.servicer.runtime import runtime_handlers as serverapp_io

    def request(call: Args) -> Any:
        return _arg(call, "request", 0)

    _held(fleet, "pull_messages", hold, lambda c: ("ins", request(c).node.node_id), _no_messages)
    _held(
        serverapp_io,
        "pull_messages",
        hold,
        lambda c: ("res", _arg(c, "task", 2).run_id),
        _no_messages,
    )
    for module in (fleet, serverapp_io):
        _held(module, "pull_object", hold, lambda c: ("obj", request(c).object_id), _not_uploaded)
        _notifying(module, "push_object", notify, lambda c: [("obj", request(c).object_id)])
    _notifying(
        serverapp_io,
        "push_messages",
        notify,
        lambda c: [("ins", m.metadata.dst_node_id) for m in request(c).messages_list],
    )
    _notifying(
        fleet,
        "push_messages",
        notify,
        lambda c: [("res", m.metadata.run_id) for m in request(c).messages_list],
    )


def cache_run_checks(seconds: float = 0.25) -> None:
    """In this SuperLink process, trust for `seconds` that a run a SuperNode works for may go
    on. Flower checks the run's status (an SQL select, and an update that expires task
    tokens) on every object a SuperNode pushes or pulls: a round's most frequent queries.
    A run that ends is noticed at most `seconds` later. Call before `flower_superlink()`."""
    from flwr.superlink.servicer.fleet import fleet_handlers as fleet

    check = fleet.check_abort
    passed: dict[tuple[int, tuple[str, ...]], float] = {}

    def check_abort(run_id: int, abort_status_list: list[str], state: Any) -> str | None:
        key = (run_id, tuple(abort_status_list))
        if time.monotonic() - passed.get(key, -seconds) < seconds:
            return None
        reason = check(run_id, abort_status_list, state)
        if reason is None:
            passed[key] = time.monotonic()
        return reason

    setattr(fleet, "check_abort", check_abort)  # noqa: B010


def wake_on_replies(wake: Callable[[], None]) -> None:
    """In this SuperNode process, call `wake()` whenever the ClientApp runtime has pushed a
    reply or one of its objects (what the SuperNode waits for in `reply_wait`). Call before
    `flower_supernode()`."""
    from flwr.supernode.servicer.runtime import runtime_handlers

    for name in ("push_messages", "push_object"):
        _notifying(runtime_handlers, name, lambda keys: wake(), lambda _: ())


def hold_task_claims(wait: Callable[[], object]) -> None:
    """In this SuperNode process, call `wait()` (which returns once a message has arrived
    with all its objects, or after a while) before each claim of a task by the ClientApp
    runtime. Flower creates the task before the message's objects are pulled, and answers a
    claim at once: the runtime would poll, then pull objects that are not there yet. Call
    before `flower_supernode()`."""
    from flwr.supernode.servicer.runtime import runtime_handlers

    acquire = runtime_handlers.acquire_task

    @functools.wraps(acquire)
    def acquire_task(*args: Any, **kwargs: Any) -> Any:
        wait()
        return acquire(*args, **kwargs)

    setattr(runtime_handlers, "acquire_task", acquire_task)  # noqa: B010


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


def _check_held_handlers() -> None:
    """The routers still call the handlers fedge holds, wraps and caches through module
    attributes, and the answers still carry the fields fedge reads."""
    import importlib

    from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611
    from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611

    def source(module: str) -> str:
        return Path(inspect.getsourcefile(importlib.import_module(module)) or "").read_text()

    fleet = source("flwr.superlink.routers.fleet.router")
    runtime = source("flwr.supercore.routers.runtime.router")
    for name in ("pull_messages", "push_messages", "pull_object", "push_object"):
        if f"fleet_handlers.{name}(" not in fleet or f"handlers.{name}(" not in runtime:
            raise RuntimeError(f"the routers no longer call {name} through its module")
    if "handlers.acquire_task(" not in runtime:
        raise RuntimeError("the Runtime router no longer claims tasks through its handlers")
    for side in ("superlink", "supernode"):
        handlers = importlib.import_module(f"flwr.{side}.servicer.runtime.runtime_handlers")
        main = source(f"flwr.{side}.main")
        if "_RUNTIME_HANDLERS: RuntimeHandlers[" not in main or not callable(
            getattr(handlers, "acquire_task", None)
        ):
            raise RuntimeError(f"the {side}'s Runtime API handlers are no longer its module")
    if "abort_msg = check_abort(" not in source("flwr.superlink.servicer.fleet.fleet_handlers"):
        raise RuntimeError("the Fleet handlers no longer check the run through check_abort")
    answer = PullObjectResponse(object_found=True, object_available=False)
    if not _not_uploaded(answer) or not _no_messages(PullMessagesResponse()):
        raise RuntimeError("Flower's pull answers changed their fields")
    if AcquireTaskResponse().HasField("task"):
        raise RuntimeError("an empty AcquireTaskResponse now carries a task")


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
        _check_held_handlers()
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
