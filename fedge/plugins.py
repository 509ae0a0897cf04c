"""Plug-ins named `package.module:Name` (tasks, strategies, ClientApps, schedulers)."""

from __future__ import annotations

import importlib
from typing import Any

from fedge.errors import ConfigError


def load_object(spec: str) -> Any:
    """Import `package.module:Name`; errors say what was wrong and how to write it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
