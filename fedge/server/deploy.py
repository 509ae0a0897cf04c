"""`fedge server`: a real Flower SuperLink plus one run of fedge's ServerApp on it.

Flower 1.42 needs three things for a deployed run: a SuperLink process (one HTTP port for
SuperNodes and the control API), a Flower App folder naming the ServerApp and ClientApp,
and `flwr run` pointed at the SuperLink through a connection in `$FLWR_HOME/config.toml`.
fedge writes the app folder and the connection inside `--out`, so nothing outside the run
folder is touched, and runs with dependency installation off (everything is installed).
With `--app DIR` the run is that Flower App folder, unmodified, with its run config
overrides: its ServerApp runs beside the SuperLink and devices run its ClientApp (from the
app bundle Flower sends them) in fedge's warm runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from fedge.app_folder import load_app
from fedge.config import RunConfig
from fedge.errors import ConfigError
from fedge.processes import (
    check_port_free,
    die_with_parent,
    flower_tool,
    start,
    stop,
    tool_env,
    wait_for_port,
)
from fedge.server.app import CONFIG_KEY, prepare
from fedge.server.certs import enrolled_keys, tls_files
from fedge.server.history import load_history
from fedge.server.preflight import prepare_out
from fedge.server.superlink import REFUSAL

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedge-run"
version = "1.0.0"
description = "A fedge run"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedge"

[tool.flwr.app.components]
serverapp = "fedge.server.app:app"
clientapp = "fedge.client.app:app"

[tool.flwr.app.config]
{key} = ""
"""

CONNECTION = """\
[superlink]
default = "fedge"

[superlink.fedge]
address = "{address}"
{security}
"""

FLOWER_LOG_PREFIXES = ("\x1b[92mINFO", "INFO ", "\x1b[94mDEBUG")
LISTEN_FILE = "listen.json"  # in the run's state folder: where `fedge server` listened
LISTEN_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 9092,
    "tls_dir": None,
    "auth": False,
}


def listen_settings(out: str, resume: bool, given: dict[str, Any]) -> dict[str, Any]:
    """Where to listen: what was given, else (resuming) where the run listened before, so
    its devices find it again, else the defaults."""
    saved: dict[str, Any] = {}
    path = Path(out, "state", LISTEN_FILE)
    if resume and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume {out}: {path} is damaged ({exc}); give --port") from None
    return {
        key: given[key] if given.get(key) is not None else saved.get(key, default)
        for key, default in LISTEN_DEFAULTS.items()
    }


def write_run_files(
    cfg: RunConfig, address: str, ca_cert: Path | None = None
) -> tuple[Path, Path, Path]:
    """The run's config JSON, the Flower App folder (`cfg.app`, else fedge's, written here)
    and FLWR_HOME, all under cfg.out."""
    out = Path(cfg.out).resolve()
    app_dir, flwr_home = out / ".flower-app", out / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    if cfg.app:
        app_dir = Path(cfg.app).resolve()
    else:
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(key=CONFIG_KEY))
    security = f'root-certificates = "{ca_cert.resolve()}"' if ca_cert else "insecure = true"
    (flwr_home / "config.toml").write_text(CONNECTION.format(address=address, security=security))
    cfg_path = out / "run-config.json"
    cfg_path.write_text(json.dumps({**cfg.to_dict(), "out": str(out)}, indent=2))
    return cfg_path, app_dir, flwr_home


def superlink_command(
    host: str, port: int, tls_dir: str | None, auth: bool, database: Path
) -> list[str]:
    """`flower-superlink`, with TLS from `tls_dir` and SuperNode authentication if asked.

    Its state lives in `database`, so a SuperLink restarted by `--resume` still knows the
    SuperNodes (which would otherwise be refused and exit) and the enrolled keys.
    """
    cmd = [sys.executable, "-m", "fedge.server.superlink"]  # Flower's, reporting refusals
    cmd.append("--disable-runtime-dependency-installation")
    cmd += ["--database", str(database)]
    if tls_dir:
        files = tls_files(tls_dir)
        cmd += ["--ssl-ca-certfile", str(files["ca"]), "--ssl-certfile", str(files["cert"])]
        cmd += ["--ssl-keyfile", str(files["key"])]
        if auth:
            cmd.append("--enable-supernode-auth")
    elif auth:
        raise ConfigError("--auth needs --tls DIR: Flower authenticates SuperNodes over TLS only")
    else:
        cmd.append("--insecure")
    return cmd + ["--host", host, "--port", str(port)]


def enrol(tls_dir: str, env: dict[str, str]) -> int:
    """Register every client public key in `tls_dir/clients` with the running SuperLink."""
    keys = enrolled_keys(tls_dir)
    for key in keys:
        done = subprocess.run(
            [flower_tool("flwr"), "supernode", "register", str(key), "fedge"],
            capture_output=True,
            text=True,
            env=tool_env(env),
        )
        said = (done.stdout + done.stderr).strip()
        if done.returncode != 0 and "already in use" not in said:  # enrolled before a --resume
            raise RuntimeError(f"enrolling {key} failed: {said}")
    return len(keys)


def serve(
    cfg: RunConfig,
    host: str = "127.0.0.1",
    port: int = 9092,
    tls_dir: str | None = None,
    auth: bool = False,
) -> list[dict[str, Any]]:
    """Start a SuperLink on host:port, run all rounds, stop the SuperLink, return history.

    `tls_dir` (from `fedge certs`) turns on TLS; `auth` admits only the SuperNodes whose
    public keys are in `tls_dir/clients`.
    """
    app = load_app(cfg.app, cfg.run_config) if cfg.app else None
    if app is None:
        prepare(cfg)  # every check that can run before the SuperLink starts
    check_port_free(host, port)
    prepare_out(cfg)
    address = f"{host}:{port}"
    ca_cert = Path(tls_dir, "ca.crt") if tls_dir else None
    cfg_path, app_dir, flwr_home = write_run_files(cfg, address, ca_cert)
    out = cfg_path.parent
    cmd = superlink_command(host, port, tls_dir, auth, out / "state" / "superlink.db")
    (out / "state").mkdir(exist_ok=True)
    listen = {"host": host, "port": port, "tls_dir": tls_dir, "auth": auth}
    (out / "state" / LISTEN_FILE).write_text(json.dumps(listen))
    # The SuperLink's SuperExec looks for a ServerApp task at Flower's 1 s: that costs at most
    # a second at the start of a run, while 0.1 s kept the SuperLink busy answering it all run.
    env = {"FLWR_HOME": str(flwr_home)}
    superlink = start(cmd, log=out / "superlink.log", env=env)
    done = threading.Event()
    threading.Thread(target=echo_refusals, args=(out / "superlink.log", done), daemon=True).start()
    try:
        wait_for_port(host, port, timeout=60, proc=superlink)
        secure = f" --tls {tls_dir}" if tls_dir else ""
        if auth:
            print(f"fedge server: enrolled {enrol(str(tls_dir), env)} client keys")
            secure += " --auth-key KEYFILE"
        print(f"fedge server: SuperLink listening on {address}; start clients with")
        task = "" if app else f" --task {cfg.task}"
        print(
            f"  fedge client --server {address}{task} --partition-id I "
            f"--num-partitions {cfg.num_clients}{secure}"
        )
        run_config = cfg.run_config if app else f"{CONFIG_KEY}='{cfg_path}'"
        run_flower_app(app_dir, run_config, env, out / "server.log", append=cfg.resume)
    finally:
        done.set()
        stop(superlink)
    if app is not None:  # the app's ServerApp keeps its own results
        return []
    history = load_history(out)
    if len(history) < cfg.rounds:
        raise RuntimeError(
            f"the run stopped after {len(history)} of {cfg.rounds} rounds; see {out}/server.log"
        )
    return history


def echo_refusals(log: Path, done: threading.Event) -> None:
    """Print the SuperLink's refusals of devices (see `fedge.server.superlink`) as they come."""
    with open(log, errors="replace") as f:
        f.seek(0, 2)  # a resumed run's log holds the last run's lines
        while not done.is_set():
            line = f.readline()
            if not line:
                done.wait(0.2)
            elif line.startswith(REFUSAL):
                print(line, end="", flush=True)


def run_flower_app(
    app_dir: Path, run_config: str, env: dict[str, str], log: Path, append: bool = False
) -> None:
    """`flwr run APP_DIR --run-config RUN_CONFIG --stream`: show the run's own lines, keep
    Flower's chatter in the log file (appended to when the run is resumed)."""
    cmd = [flower_tool("flwr"), "run", str(app_dir), "fedge", "--stream"]
    cmd += ["--run-config", run_config] if run_config else []
    with (
        open(log, "a" if append else "w") as logfile,
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=tool_env(env),
            preexec_fn=die_with_parent,  # `flwr run` must not outlive a killed `fedge server`
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            logfile.write(line)
            logfile.flush()
            if not line.startswith(FLOWER_LOG_PREFIXES) and line.strip():
                print(line, end="", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"flwr run failed with status {proc.returncode}; see {log}")
