"""The `fedge` command: run (simulation), server, client, certs, pir-server, export.

Every RunConfig field is a flag (`--num-clients`, `--lr`, ...); `--config FILE.toml` sets
any of them and flags win. Bad input (`ConfigError`, a missing file, a timeout) exits with
status 2 and one line naming what was wrong; anything else is a bug and keeps its traceback.
`fedge --debug ...` shows the traceback of bad input too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedge.config import ConfigError, RunConfig, parse_option, saved_config
from fedge.processes import reap_tree_on_exit

# RunConfig fields that configure the simulation engine, so `fedge server` has no such flags
SIMULATION_ONLY = frozenset(
    {"backend", "ray_address", "client_cpus", "client_gpus", "dropout_rate"}
) | {"devices", "device_options", "deadline", "over_select"}  # the virtual clock
NOT_FLAGS = {"resume"}  # set by `--resume DIR`


def add_run_flags(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """One flag per RunConfig field (dict fields take repeatable key=value options)."""
    parser.add_argument("--config", help="TOML file with any of the fields below; flags win")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last intact round (its config; flags win)",
    )
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or f.name in NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if str(f.type).startswith("dict"):
            parser.add_argument(
                flag.removesuffix("s"),
                dest=f.name,
                action="append",
                metavar="KEY=VALUE",
                help=f"{f.metadata['help']} (repeatable)",
            )
        elif f.type == "bool":  # `--flag` alone means true; `--flag false` also works
            parser.add_argument(
                flag,
                dest=f.name,
                nargs="?",
                const="true",
                metavar="BOOL",
                help=f"{f.metadata['help']} [{default}]",
            )
        else:
            parser.add_argument(
                flag, dest=f.name, metavar=f.name.upper(), help=f"{f.metadata['help']} [{default}]"
            )


def config_from_args(args: argparse.Namespace, skip: frozenset[str] = frozenset()) -> RunConfig:
    """Merge TOML and flags into one checked RunConfig."""
    flags: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None) if f.name not in skip else None
        if value is None:
            continue
        flags[f.name] = dict(parse_option(v) for v in value) if isinstance(value, list) else value
    if args.resume:
        return resumed_config(args.resume, flags)
    if args.config:
        return RunConfig.from_toml(args.config, flags)
    return RunConfig.from_mapping(flags)


def resumed_config(run_dir: str, flags: dict[str, Any]) -> RunConfig:
    """The config a run in `run_dir` was started with; flags may change e.g. `rounds`."""
    saved = saved_config(run_dir)
    return RunConfig.from_mapping({**saved, **flags, "out": run_dir, "resume": True})


def print_table(history: list[dict[str, Any]], metric: str) -> None:
    """The results table: one row per round."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedge results")
    for col in ("round", metric, "loss", "clients", "failures", "train s/client", "seconds"):
        table.add_column(col, justify="right")
    for r in history:
        value = r.get(metric)
        table.add_row(
            str(r["round"]),
            f"{value:.4f}" if isinstance(value, float) else "n/a",
            f"{r.get('loss', float('nan')):.4f}",
            str(r.get("num_clients", 0)),
            str(r.get("failures", 0)),
            f"{r.get('train_seconds_mean', 0.0):.2f}",
            f"{r.get('seconds', 0.0):.1f}",
        )
    Console(highlight=False).print(table)


def print_target(cfg: RunConfig, history: list[dict[str, Any]]) -> None:
    """With `--target-accuracy`: when the run first reached it (virtual time if clocked)."""
    from fedge.server.history import time_to_target
    from fedge.tasks import task_class

    if not cfg.target_accuracy:
        return
    task = task_class(cfg.task)
    hit = time_to_target(history, task.metric, cfg.target_accuracy, task.higher_is_better)
    goal = f"{task.metric} {cfg.target_accuracy:g}"
    if hit is None:
        print(f"time to {goal}: not reached in {len(history)} rounds")
        return
    virtual = f", {hit['virtual_time']:.1f} s of virtual time" if "virtual_time" in hit else ""
    print(f"time to {goal}: round {hit['round']:.0f}{virtual} ({hit['seconds']:.1f} s wall)")


def cmd_run(args: argparse.Namespace) -> int:
    from fedge.simulation import simulate

    cfg = config_from_args(args)
    reap_tree_on_exit()  # Ray's agents would outlive a killed `fedge run`
    history = simulate(cfg)
    report(cfg, history)
    return 0


def report(cfg: RunConfig, history: list[dict[str, Any]]) -> None:
    """The end of a run: its table and where its files are (a Flower App keeps its own
    results; fedge wrote only the history of its rounds, if it ran them)."""
    from fedge.tasks import task_class

    if cfg.app:
        kept = f"; history of {len(history)} rounds in {cfg.out}/" if history else ""
        print(f"fedge: the Flower App in {cfg.app} finished{kept}")
        return
    print_table(history, task_class(cfg.task).metric)
    print_target(cfg, history)
    print(f"history, checkpoints and plot in {cfg.out}/")


def cmd_server(args: argparse.Namespace) -> int:
    from fedge.server.deploy import listen_settings, serve

    if args.min_clients is not None:
        args.num_clients = args.min_clients
    cfg = config_from_args(args, skip=SIMULATION_ONLY)
    given = {"host": args.host, "port": args.port, "tls_dir": args.tls, "auth": args.auth}
    reap_tree_on_exit()  # Flower's SuperExec and ServerApp would outlive a killed server
    history = serve(cfg, **listen_settings(cfg.out, cfg.resume, given))
    report(cfg, history)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from fedge.client.sdk import join

    return join(
        server=args.server,
        task=args.task,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        max_train_seconds=args.max_train_seconds,
        data_dir=args.data_dir,
        tls_dir=args.tls,
        auth_key=args.auth_key,
        isolation=args.isolation,
        torch_threads=args.torch_threads,
    )


def cmd_certs(args: argparse.Namespace) -> int:
    from fedge.server.certs import DEFAULT_HOSTS, make_certs

    out = make_certs(args.dir, hosts=args.host or DEFAULT_HOSTS, clients=args.clients)
    print(f"CA, server certificate and {args.clients} client key(s) in {out}/")
    print(f"  server: fedge server --tls {out} [--auth]")
    print(f"  client: fedge client --tls DIR_WITH_CA_CRT --auth-key {out}/clients/client_I ...")
    return 0


def cmd_pir_server(args: argparse.Namespace) -> int:
    from fedge.privacy.service import serve

    try:  # fedge.privacy stands alone: its bad-input errors are plain ValueErrors
        serve(args.table, party=args.party, host=args.host, port=args.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedge.edge.export import FORMATS, export_model, load_run

    run = load_run(args.run_dir, args.round)
    suffix = FORMATS[args.format].SUFFIX if args.format in FORMATS else ""
    out = (
        args.out
        or Path(args.run_dir) / f"model{'.' + args.quantize if args.quantize else ''}{suffix}"
    )
    print(f"fedge export: {run.cfg.task} model from {run.weights}", flush=True)
    given = {"tolerance": args.tolerance, "batch_size": args.batch_size}
    given["calibration_size"] = args.calibration_size
    report = export_model(
        run.task,
        run.model,
        args.format,
        out,
        quantize=args.quantize,
        seed=run.cfg.seed,
        say=lambda line: print(f"fedge export: {line}", flush=True),
        **{k: v for k, v in given.items() if v is not None},  # else export_model's defaults
    )
    print_export(report)
    return 0


def print_export(report: Any) -> None:
    """The parity table of an export: metric and largest output gap, torch beside each file."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedge export: {report.format}")
    for col in ("model", report.metric, "loss", "max |diff| vs torch"):
        table.add_column(col, justify="right")
    for name, metrics in report.metrics.items():
        diff = report.max_abs_diff.get(name)
        table.add_row(
            name,
            f"{metrics.get(report.metric, float('nan')):.4f}",
            f"{metrics.get('loss', float('nan')):.4f}",
            "-" if diff is None else f"{diff:.3g}",
        )
    Console(highlight=False).print(table)
    limits = ", ".join(f"{k} in {lo}..{hi}" for k, (lo, hi) in report.bounds.items())
    print(
        f"wrote {report.path} ({report.size_bytes / 1024:.1f} KiB) in {report.seconds:.1f} s; "
        f"inputs: {limits or 'fixed shapes'}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge", description="Federated learning for edge devices, built on Flower."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate a federated run in one process tree")
    add_run_flags(run)
    run.set_defaults(func=cmd_run)

    server = sub.add_parser("server", help="start a Flower SuperLink and run the federation")
    add_run_flags(server, skip=SIMULATION_ONLY)
    server.add_argument("--min-clients", type=int, help="clients to wait for (= --num-clients)")
    resumed = "; --resume: as the run had it"
    server.add_argument("--host", help=f"address to listen on [127.0.0.1{resumed}]")
    server.add_argument("--port", type=int, help=f"SuperLink port [9092{resumed}]")
    server.add_argument(
        "--tls", metavar="DIR", help=f"serve over TLS with `fedge certs DIR` files [{resumed[2:]}]"
    )
    server.add_argument(
        "--auth",
        action="store_true",
        default=None,
        help=f"admit only clients enrolled in DIR/clients/*.pub [{resumed[2:]}]",
    )
    server.set_defaults(func=cmd_server)

    client = sub.add_parser("client", help="start one client process that joins a server")
    client.add_argument("--server", required=True, metavar="HOST:PORT")
    client.add_argument("--task", default="digits", help="the server's task [digits]")
    client.add_argument("--partition-id", type=int, help="a simulated share (experiments)")
    client.add_argument("--num-partitions", type=int, help="with --partition-id")
    client.add_argument(
        "--max-train-seconds", type=float, default=0.0, help="round budget [0: none]"
    )
    client.add_argument(
        "--data-dir", help="the device's own data, in the task's format (no partition flags)"
    )
    client.add_argument("--tls", metavar="DIR", help="connect over TLS, trusting DIR/ca.crt")
    client.add_argument("--auth-key", help="this client's enrolled private key (server --auth)")
    client.add_argument(
        "--isolation",
        default="runtime",
        choices=("runtime", "subprocess"),
        help="runtime: fedge's warm ClientApp process; subprocess: Flower's, one per message",
    )
    client.add_argument(
        "--torch-threads", type=int, help="torch threads of the runtime [half the cores, <= 4]"
    )
    client.set_defaults(func=cmd_client)

    certs = sub.add_parser("certs", help="make a CA, a server certificate and client keys")
    certs.add_argument("dir", help="folder to write them into")
    certs.add_argument(
        "--host", action="append", help="server host name or IP (repeatable) [127.0.0.1, localhost]"
    )
    certs.add_argument("--clients", type=int, default=0, help="client key pairs to make [0]")
    certs.set_defaults(func=cmd_certs)

    pir = sub.add_parser("pir-server", help="serve one party of two-server private retrieval")
    pir.add_argument("--table", required=True, help="the embedding table, a .npy file")
    pir.add_argument("--party", type=int, choices=(0, 1), required=True)
    pir.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    pir.add_argument(
        "--port", type=int, default=50051, help="port to listen on, 0 picks a free one [50051]"
    )
    pir.set_defaults(func=cmd_pir_server)

    export = sub.add_parser("export", help="export a run's model for a device runtime")
    export.add_argument("run_dir", help="a fedge run's --out folder")
    export.add_argument("--format", required=True, help="executorch (.pte, XNNPACK) or onnx")
    export.add_argument("--quantize", choices=("int8",), help="post-training int8 quantization")
    export.add_argument("--out", help="file to write [RUN_DIR/model[.int8].pte|.onnx]")
    export.add_argument("--round", type=int, help="that round's checkpoint [final_model.pt]")
    export.add_argument(
        "--tolerance",
        type=float,
        help="largest fp32 output gap to torch on the test set; beyond it nothing is written",
    )
    export.add_argument("--batch-size", type=int, help="the largest batch the file takes")
    export.add_argument("--calibration-size", type=int, help="training samples int8 calibrates on")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if os.getcwd() not in sys.path:  # `module:Class` plug-ins resolve from here, as with -m
        sys.path.insert(0, os.getcwd())
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError, TimeoutError) as exc:
        if args.debug:
            raise
        print(f"fedge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
