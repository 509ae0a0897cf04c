"""ASRTask (phrases, CTC, CER) through the Task interface: data, options, local training."""

import numpy as np
import pytest

from fedge.tasks.asr.data import PHRASES
from fedge.tasks.asr.task import ASRTask, decode_text, encode_text
from fedge.tasks.base import TrainConfig
from fedge.tasks.registry import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_builds_the_task_with_speaker_groups():
    task = build_task("asr", speakers=4, test_speakers=2, copies=2)
    assert isinstance(task, ASRTask) and task.metric == "cer" and not task.higher_is_better
    assert len(task.train_labels()) == 4 * len(PHRASES) * 2
    assert np.bincount(task.train_groups()).tolist() == [len(PHRASES) * 2] * 4
    assert set(task.train_labels().tolist()) == set(range(len(PHRASES)))
    feats, target = task.train_dataset(np.array([0]))[0]
    assert feats.shape[1] == 40 and decode_text(target) == PHRASES[0]
    assert len(task.test_dataset()) == 2 * len(PHRASES)


def test_unknown_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown options"):
        ASRTask(speakers=2, test_speakers=1, copies=1, nope=1)
    with pytest.raises(ValueError, match="fold=3"):
        ASRTask(speakers=2, test_speakers=1, copies=1, fold=3)
    with pytest.raises(ValueError, match="outside the alphabet"):
        encode_text("go 2 left")


def test_local_training_lowers_cer_and_loss():
    task = ASRTask(speakers=12, test_speakers=3, copies=2, n_layer=2, energy_reports=False)
    model = task.build_model()
    test = task.test_dataset()
    before = task.evaluate(model, test)
    cfg = TrainConfig(epochs=10, batch_size=8, lr=0.02, momentum=0.9)
    report = task.train(model, task.train_dataset(), cfg)
    after = task.evaluate(model, test)
    assert report.steps == 10 * 36
    assert after["loss"] < 0.6 * before["loss"]
    assert after["cer"] < before["cer"] - 0.2, (before, after)
    assert set(after) >= {"loss", "cer", "wer", "accuracy", "num_examples"}


def test_evaluation_reports_energy_of_the_model():
    task = ASRTask(speakers=2, test_speakers=1, copies=1, fold=2)
    out = task.evaluate(task.build_model(), task.test_dataset())
    assert out["energy_uw"] > 0 and out["weight_bytes"] > 0 and 0 <= out["cer"] <= 2
