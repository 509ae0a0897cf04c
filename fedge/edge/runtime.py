"""The warm ClientApp runtime: one long-lived process per device, beside its SuperNode.

Flower's SuperNode, started with `--isolation process`, queues each message it pulls as a
task on its Runtime API and waits for the reply. Flower's SuperExec would start one
`flwr-clientapp` process per task (unpack the app, import torch and fedge, build the Task,
load the data, every time). This process does the same work over the same API and stays:
torch, fedge and the ClientApp are imported at start; the run's Task, data and model are
loaded by the first message of a run and reused by every later one. A message of a new run
re-executes the process first (same pid), so every run starts from a fresh interpreter. A
ClientApp that raises gives an error reply and the runtime carries on. The message being
handled is written to `--state-dir`, so a runtime that is killed is answered for by its
successor: the server gets an error reply at once instead of waiting out the task.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge import compat
from fedge.edge.poll import Backoff
from fedge.edge.supervisor import FATAL, default_torch_threads

TOKEN_ENV, RUN_ENV = "FEDGE_RUNTIME_TOKEN", "FEDGE_RUNTIME_RUN"  # a claimed task, across exec
INFLIGHT = "inflight"  # in --state-dir: the token and the message being handled


def say(text: str) -> None:
    print(f"fedge runtime: {text}", file=sys.stderr, flush=True)


class Runtime:
    """Serves the ClientApp tasks of one SuperNode's Runtime API at `address`."""

    def __init__(self, address: str, state_dir: Path) -> None:
        self.address = address
        self.inflight = state_dir / INFLIGHT
        self.run_id: int | None = None
        self.apps: dict[str, Any] = {}  # FAB hash -> its loaded ClientApp
        self.handled = 0

    def serve(self, poll: Backoff) -> None:
        """Claim and handle tasks until the process is stopped."""
        acquirer = compat.runtime_client(self.address)
        silent_since: float | None = None
        while True:
            try:
                claimed = compat.acquire_clientapp_task(acquirer)
            except Exception as exc:  # noqa: BLE001 - the SuperNode may be busy or restarting
                if silent_since is None:
                    silent_since = time.monotonic()
                    say(f"the SuperNode's Runtime API at {self.address} does not answer: {exc}")
                poll.wait()
                continue
            if silent_since is not None:
                say(f"the SuperNode answers again after {time.monotonic() - silent_since:.0f} s")
                silent_since = None
            if claimed is None:
                poll.wait()
                continue
            poll.reset()
            run_id, token = claimed
            if self.run_id is not None and run_id != self.run_id:
                self.restart(run_id, token)
            self.handle(run_id, token)

    def restart(self, run_id: int, token: str) -> None:
        """Become a fresh runtime (same pid) that starts with this claimed task."""
        say(f"run {run_id} starts; reloading (the last run was {self.run_id})")
        env = {**os.environ, TOKEN_ENV: token, RUN_ENV: str(run_id)}
        os.execve(sys.executable, [sys.executable, "-m", "fedge.edge.runtime", *sys.argv[1:]], env)

    def handle(self, run_id: int, token: str) -> None:
        """Run the ClientApp on the task's message; always answer and finish the task."""
        self.run_id = run_id
        task = compat.RuntimeTask(self.address, token)
        message = context = reply = None
        details, started = "", time.perf_counter()
        try:
            message, context, run, fab = task.pull()
            self.inflight.write_bytes(token.encode() + b"\n" + compat.message_bytes(message))
            app = self.apps.get(fab.hash_str)
            if app is None:
                app = self.apps[fab.hash_str] = compat.load_client_app(fab, run)
                say(
                    f"run {run_id}: loaded its ClientApp ({fab.hash_str[:12]}) in pid {os.getpid()}"
                )
            started = time.perf_counter()
            reply = app(message=message, context=context)
        except Exception as exc:  # noqa: BLE001 - any ClientApp failure becomes an error reply
            details = f"{type(exc).__name__}: {exc}"
            say(f"the ClientApp raised on a message of run {run_id}:\n{traceback.format_exc()}")
            if message is not None:
                reply = compat.error_reply(message, details)
        try:
            task.push(reply, context, details)
        except Exception as exc:  # noqa: BLE001 - the SuperNode times the task out itself
            say(f"could not hand the reply of run {run_id} to the SuperNode: {exc}")
        self.inflight.unlink(missing_ok=True)
        self.handled += 1
        if message is not None:
            kind, took = message.metadata.message_type, time.perf_counter() - started
            outcome = f"failed ({details})" if details else f"answered in {took:.2f} s"
            say(f"run {run_id}: {kind} message {outcome}; pid {os.getpid()} handled {self.handled}")

    def recover(self) -> None:
        """Answer the message a killed predecessor was handling, with an error reply."""
        if not self.inflight.exists():
            return
        token, _, data = self.inflight.read_bytes().partition(b"\n")
        self.inflight.unlink()
        try:
            message = compat.message_from_bytes(data)
            reason = "the device's ClientApp runtime died while handling this message"
            reply = compat.error_reply(message, reason, code=compat.ErrorCode.CLIENT_APP_CRASHED)
            task = compat.RuntimeTask(self.address, token.decode())
            task.push(reply, compat.bare_context(message), details=reason, save_context=False)
            say(f"answered message {message.metadata.message_id[:12]} of the runtime that died")
        except Exception as exc:  # noqa: BLE001 - the SuperNode times that task out instead
            say(f"could not answer the message the last runtime died on: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedge.edge.runtime", description=__doc__)
    parser.add_argument("--runtime-api", required=True, metavar="HOST:PORT")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--torch-threads", type=int, default=default_torch_threads())
    parser.add_argument("--task", required=True, help="the task this device was started for")
    args = parser.parse_args(argv)
    if args.torch_threads < 1:
        parser.error(f"--torch-threads {args.torch_threads}: must be >= 1")
    if os.getcwd() not in sys.path:  # `module:Class` tasks resolve from here, as in the CLI
        sys.path.insert(0, os.getcwd())
    compat.patch_object_pulls("flwr.supernode.runtime.run_clientapp")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(args.runtime_api, args.state_dir)
    runtime.recover()  # before the imports below: the server hears of a crash at once
    import torch

    torch.set_num_threads(args.torch_threads)
    import fedge.client.app  # noqa: F401 - warm: fedge's ClientApp and all it imports
    from fedge.tasks import task_class

    try:
        task_class(args.task)
    except (ValueError, ImportError) as exc:
        say(f"error: {exc}")
        return FATAL
    if token := os.environ.pop(TOKEN_ENV, ""):
        runtime.handle(int(os.environ.pop(RUN_ENV)), token)
    try:
        runtime.serve(Backoff(low=0.005, high=0.2, factor=1.3))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
