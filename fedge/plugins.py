"""Plug-ins named `package.module:Name` (tasks, strategies, ClientApps, schedulers)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError


def load_object(spec: str, search_path: str | Path | None = None) -> Any:
    """Import `package.module:Name`; errors say what was wrong and how to write it.

    `search_path`: a folder to import from first (a Flower App's own folder)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r} is not of the form 'package.module:ClassName'")
    if search_path is not None and str(search_path) not in sys.path:
        sys.path.insert(0, str(search_path))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    found: Any = module
    for name in attr.split("."):  # `module:outer.inner`, as Flower's references allow
        try:
            found = getattr(found, name)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    return found
