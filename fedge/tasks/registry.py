"""Task registry: a short name, or any `package.module:ClassName`, to a Task class."""

from __future__ import annotations

import importlib
from typing import Any

from fedge.tasks.base import Task

# Imported lazily so that `fedge --help` does not pay for every model's imports.
TASKS: dict[str, str] = {
    "digits": "fedge.tasks.digits:DigitsTask",
    "mobilellm": "fedge.tasks.mobilellm.task:MobileLLMTask",
    "asr": "fedge.tasks.asr.task:ASRTask",
    "kws": "fedge.tasks.asr.task:KeywordTask",
    "hrvit": "fedge.tasks.hrvit.task:HRViTTask",
}


def load_object(spec: str) -> Any:
    """Import `package.module:Name`; errors say what was wrong and how to write it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def task_class(name: str) -> type[Task]:
    """The Task class registered under `name`, or imported from `module:Class`."""
    spec = TASKS.get(name, name)
    if ":" not in spec:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or 'module:Class'")
    cls = load_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"{spec!r} is not a fedge.tasks.Task subclass")
    return cls


def build_task(name: str, data_dir: str | None = None, seed: int = 0, **options: Any) -> Task:
    """Instantiate a task by name with its options."""
    return task_class(name)(data_dir=data_dir, seed=seed, **options)
