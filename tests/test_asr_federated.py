"""Federated speech: speakers as clients (natural non-IID) through `simulate`."""

import pytest
import torch

from fedge.config import RunConfig
from fedge.simulation import simulate
from fedge.tasks.registry import build_task


def federated(run_dir, task: str, options: dict, **kw) -> tuple[dict, list[dict]]:
    torch.set_num_threads(1)
    t = build_task(task, **options)
    before = t.evaluate(t.build_model(), t.test_dataset())
    base = dict(
        task=task,
        task_options=options,
        partition="natural",
        batch_size=4,
        lr=0.02,
        momentum=0.9,
        eval_fraction=0.0,
        backend="local",  # in-process: no Ray cluster needed, deterministic
        out=str(run_dir),
    )
    return before, simulate(RunConfig.from_mapping({**base, **kw}))


def test_short_federated_run_lowers_cer(run_dir):
    options = dict(speakers=6, test_speakers=3, copies=2, n_layer=2)
    before, history = federated(run_dir, "asr", options, num_clients=2, rounds=4, local_epochs=4)
    cers = [r["cer"] for r in history]
    assert cers[-1] < before["cer"] - 0.15, (before["cer"], cers)
    assert history[-1]["loss"] < history[0]["loss"] < before["loss"]
    assert all(r["num_clients"] == 2 and r["failures"] == 0 for r in history)
    assert history[-1]["energy_uw"] > 0  # the energy estimate travels with the metrics


@pytest.mark.slow
def test_federated_keyword_spotting_one_speaker_per_client(run_dir):
    options = dict(speakers=10, test_speakers=4, copies=3, n_layer=2)
    before, history = federated(
        run_dir, "kws", options, num_clients=10, rounds=15, local_epochs=3, batch_size=8
    )
    assert history[-1]["accuracy"] > before["accuracy"] + 0.3, (before, history[-1])


@pytest.mark.slow
def test_federated_asr_cer_falls_clearly(run_dir):
    options = dict(speakers=20, test_speakers=4, copies=2, n_layer=2)
    before, history = federated(
        run_dir, "asr", options, num_clients=5, rounds=8, local_epochs=3, batch_size=4
    )
    assert history[-1]["cer"] < before["cer"] - 0.3, (before["cer"], history[-1]["cer"])
