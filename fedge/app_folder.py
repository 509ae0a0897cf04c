"""A Flower App folder, read as Flower reads it: its components and its run config.

A Flower App is a folder whose `pyproject.toml` names a ServerApp and a ClientApp in
`[tool.flwr.app.components]` and declares its run config with defaults in
`[tool.flwr.app.config]`. fedge runs such a folder unmodified (`fedge run --app DIR`,
`fedge server --app DIR`); this module reads it with Flower's own functions, so a folder,
an override or a component that `flwr run` refuses is refused here too, with one line
saying what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import UserConfig
from flwr.clientapp import ClientApp
from flwr.common.config import (
    flatten_dict,
    fuse_dicts,
    get_project_config,
    parse_config_args,
    validate_config,
)
from flwr.serverapp import ServerApp

from fedge.errors import ConfigError, did_you_mean
from fedge.plugins import load_object

COMPONENTS = {"serverapp": ServerApp, "clientapp": ClientApp}


@dataclass(frozen=True)
class FlowerApp:
    """A checked Flower App folder: where it is, its components and its config defaults."""

    path: Path
    serverapp: str  # "module:attribute", importable from `path`
    clientapp: str
    defaults: UserConfig  # `[tool.flwr.app.config]`, flattened ("a.b" keys) as Flower does

    def overrides(self, text: str = "") -> UserConfig:
        """'key=value ...', parsed as `flwr run --run-config` parses it; a key the app does
        not declare is an error, as in `flwr run`."""
        try:
            given = parse_config_args([text]) if text.strip() else {}
        except Exception as exc:  # Flower raises click's exception for a malformed string
            raise ConfigError(f"run_config: {getattr(exc, 'message', exc)}") from None
        for key in given:
            if key not in self.defaults:
                declared = ", ".join(self.defaults) or "none"
                raise ConfigError(
                    f"run_config: {key!r} is not in the app's [tool.flwr.app.config]"
                    f"{did_you_mean(key, self.defaults)}; it declares: {declared}"
                )
        return given

    def load(self, kind: str) -> Any:
        """The app's ServerApp or ClientApp object (`kind`: serverapp, clientapp), imported
        with the app's folder on the import path, as Flower imports it."""
        spec = getattr(self, kind)
        where = f"app {self.path}: {kind} {spec!r}"
        try:
            component = load_object(spec, search_path=self.path)
        except ConfigError as exc:
            raise ConfigError(f"{where} does not import: {exc}") from None
        except Exception as exc:  # the app's module itself raised while being imported
            raise ConfigError(f"{where} does not import: {type(exc).__name__}: {exc}") from None
        if not isinstance(component, COMPONENTS[kind]):
            want = COMPONENTS[kind].__name__
            raise ConfigError(f"{where} is a {type(component).__name__}, not a Flower {want}")
        return component


def read_app(path: str | Path) -> FlowerApp:
    """Read and check the Flower App folder at `path` (its pyproject.toml, as Flower does)."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"app: {path} is not a folder")
    try:
        project = get_project_config(folder)
    except FileNotFoundError:
        raise ConfigError(
            f"app: {path} is not a Flower App: it has no pyproject.toml (make one with `flwr new`)"
        ) from None
    except Exception as exc:  # invalid TOML, or fields Flower requires are missing
        said = str(exc).replace(":\n  - ", ": ").replace("\n  - ", "; ")
        raise ConfigError(f"app: {path} is not a Flower App: {said}") from None
    valid, errors, _ = validate_config(project, check_module=False)  # FAB format, references
    if not valid:
        raise ConfigError(f"app: {path} is not a Flower App: {'; '.join(errors)}")
    app = project["tool"]["flwr"]["app"]
    components = app["components"]
    if "serverapp" not in components or "clientapp" not in components:  # an agent app
        raise ConfigError(f"app: {path} names no serverapp and clientapp to run")
    defaults = flatten_dict(app.get("config", {}))  # its values were checked with the rest
    return FlowerApp(folder, components["serverapp"], components["clientapp"], defaults)


@dataclass(frozen=True)
class LoadedApp:
    """A Flower App ready to run: its folder, its run config and its two components."""

    app: FlowerApp
    overrides: UserConfig  # what `run_config` changed, as a Run carries it
    run_config: UserConfig  # the defaults with the overrides fused in (Flower's fusing)
    server_app: ServerApp
    client_app: ClientApp


def load_app(path: str | Path, run_config: str = "") -> LoadedApp:
    """The Flower App at `path` with the overrides `run_config` ('key=value ...'), every
    part checked and both components imported, so that a broken app fails before an
    engine or a SuperLink starts, with one line saying why."""
    app = read_app(path)
    overrides = app.overrides(run_config)
    fused = fuse_dicts(app.defaults, overrides)
    return LoadedApp(app, overrides, fused, app.load("serverapp"), app.load("clientapp"))
