"""Every on-device task federates through `simulate` and learns, with its natural non-IID
clients (speakers, procedural styles, topic groups) on the in-process grid."""

from dataclasses import dataclass, field
from typing import Any

import pytest

from fedge.config import RunConfig
from fedge.simulation import simulate
from fedge.tasks.registry import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """A task, its options and run settings, and how far its metric must move."""

    task: str
    options: dict[str, Any]
    run: dict[str, Any]
    better_by: float  # the final metric beats the untrained model's by at least this much
    factor: float = 1.0  # ...and, higher-is-better, is at least `factor` x the untrained one
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # in every record
    first_round_learns: bool = False  # round 1's loss already below the untrained model's


SPEECH = dict(partition="natural", batch_size=4, lr=0.02, momentum=0.9)
CASES = [
    pytest.param(
        Case(
            "asr",
            dict(speakers=6, test_speakers=3, copies=2, n_layer=2),
            dict(SPEECH, num_clients=2, rounds=4, local_epochs=4),
            better_by=0.15,
            bounds={"energy_uw": (1e-12, float("inf"))},  # the energy estimate travels along
            first_round_learns=True,
        ),
        id="asr",
    ),
    pytest.param(
        Case(
            "hrvit",
            dict(image_size=32, num_images=64, num_test_images=32, num_styles=4),
            dict(
                partition="natural", num_clients=4, rounds=3, local_epochs=2, batch_size=8, lr=0.1
            ),
            # measured: mIoU 0.078 before, then 0.081, 0.096, 0.123 (a fresh venv on
            # 2026-12-02; earlier venvs gave 0.141 at round 3 with the same code, and a 4th
            # round stays at 0.121). The paper's six-stage design learns these 32 px toy
            # scenes slower than fedge's former four-stage model did (0.028 -> 0.146).
            better_by=0.03,
            factor=1.4,
            bounds={"pixel_accuracy": (0.0, 1.0)},
        ),
        id="hrvit",
    ),
    pytest.param(
        Case(
            "mobilellm",
            dict(seq_len=32, layer_dropout=0.1, early_exit_scale=1.0, curriculum="rotational"),
            dict(
                partition="natural",
                num_clients=10,
                clients_per_round=2,
                rounds=2,
                local_epochs=1,
                batch_size=16,
                lr=0.2,
            ),
            better_by=0.0,
            factor=3.0,  # perplexity falls below a third of the untrained model's
        ),
        id="mobilellm",
    ),
    pytest.param(
        Case(
            "kws",
            dict(speakers=10, test_speakers=4, copies=3, n_layer=2),
            dict(SPEECH, num_clients=10, rounds=15, local_epochs=3, batch_size=8),
            better_by=0.3,
        ),
        id="kws-one-speaker-per-client",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Case(
            "asr",
            dict(speakers=20, test_speakers=4, copies=2, n_layer=2),
            dict(SPEECH, num_clients=5, rounds=8, local_epochs=3),
            better_by=0.3,
        ),
        id="asr-cer-falls-clearly",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_every_task_federates_and_learns(case: Case, run_dir):
    task = build_task(case.task, **case.options)
    before = task.evaluate(task.build_model(), task.test_dataset())
    settings = dict(task=case.task, task_options=case.options, eval_fraction=0.0, backend="local")
    history = simulate(RunConfig.from_mapping({**settings, **case.run, "out": str(run_dir)}))
    metric, sampled = task.metric, case.run.get("clients_per_round") or case.run["num_clients"]
    assert len(history) == case.run["rounds"]
    assert all(r["num_clients"] == sampled and r["failures"] == 0 for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    first, last = before[metric], history[-1][metric]
    if task.higher_is_better:
        assert last > max(case.factor * first, first + case.better_by), (first, last)
    else:
        assert last < min(first / case.factor, first - case.better_by), (first, last)
    if case.first_round_learns:
        assert history[0]["loss"] < before["loss"]
    for key, (lo, hi) in case.bounds.items():
        assert all(lo <= r[key] <= hi for r in history), key
