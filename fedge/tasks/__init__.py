"""What a client learns: the Task interface and the registry of tasks."""

from fedge.tasks.base import Task, TrainConfig, TrainReport
from fedge.tasks.registry import TASKS, build_task, task_class

__all__ = ["TASKS", "Task", "TrainConfig", "TrainReport", "build_task", "task_class"]
