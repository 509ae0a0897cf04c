"""Task registry: a short name, or any `package.module:ClassName`, to a Task class."""

from __future__ import annotations

from typing import Any

from fedge.errors import ConfigError, did_you_mean
from fedge.plugins import load_object
from fedge.tasks.base import Task

# Imported lazily so that `fedge --help` does not pay for every model's imports.
TASKS: dict[str, str] = {
    "digits": "fedge.tasks.digits:DigitsTask",
    "mobilellm": "fedge.tasks.mobilellm.task:MobileLLMTask",
    "asr": "fedge.tasks.asr.task:ASRTask",
    "kws": "fedge.tasks.asr.task:KeywordTask",
    "hrvit": "fedge.tasks.hrvit.task:HRViTTask",
    "synthetic": "fedge.tasks.synthetic:SyntheticTask",
    "femnist": "fedge.tasks.leaf:FemnistTask",
    "shakespeare": "fedge.tasks.leaf:ShakespeareTask",
    "sent140": "fedge.tasks.leaf:Sent140Task",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered under `name`, or imported from `module:Class`."""
    spec = TASKS.get(name, name)
    if ":" not in spec:
        raise ConfigError(
            f"unknown task {name!r}{did_you_mean(name, TASKS)}; "
            f"choose one of {sorted(TASKS)} or 'module:Class'"
        )
    cls = load_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"{spec!r} is not a fedge.tasks.Task subclass")
    return cls


def build_task(name: str, data_dir: str | None = None, seed: int = 0, **options: Any) -> Task:
    """Instantiate a task by name with its options; a task rejects bad options or a bad data
    folder with ValueError, which becomes a ConfigError naming the task."""
    cls = task_class(name)
    try:
        return cls(data_dir=data_dir, seed=seed, **options)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # TypeError: an option the task does not take
        raise ConfigError(f"task {name}: {exc}") from exc
