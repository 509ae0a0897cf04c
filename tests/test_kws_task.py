"""KeywordTask: ten keywords by synthetic speakers, or a Speech Commands folder."""

import numpy as np
import pytest
from asr_fixtures import write_wav

from fedge.tasks.asr.data import KEYWORDS
from fedge.tasks.asr.task import KeywordTask
from fedge.tasks.base import TrainConfig
from fedge.tasks.registry import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_builds_ten_keyword_classes_per_speaker():
    task = build_task("kws", speakers=5, test_speakers=2, copies=2)
    assert isinstance(task, KeywordTask) and task.metric == "accuracy" and task.higher_is_better
    labels, groups = task.train_labels(), task.train_groups()
    assert np.bincount(labels).tolist() == [10] * 10
    assert np.bincount(groups).tolist() == [20] * 5
    assert set(labels[groups == 3].tolist()) == set(range(10))  # every speaker says every word
    feats, label = task.train_dataset(np.array([3]))[0]
    assert feats.shape == (98, 40) and KEYWORDS[label] == KEYWORDS[labels[3]]


def test_local_training_learns_well_above_chance():
    task = KeywordTask(speakers=15, test_speakers=4, copies=2, n_layer=2, energy_reports=False)
    model = task.build_model()
    test = task.test_dataset()
    before = task.evaluate(model, test)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.02, momentum=0.9)
    task.train(model, task.train_dataset(), cfg)
    after = task.evaluate(model, test)
    assert after["accuracy"] >= 0.4 > before["accuracy"] + 0.15, (before, after)
    assert after["loss"] < before["loss"]


def test_speech_commands_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for word in ("yes", "no", "stop"):
        for spk in ("s1", "s2", "s3"):
            write_wav(tmp_path / word / f"{spk}_nohash_0.wav", rng.normal(0, 0.1, 12000))
    (tmp_path / "testing_list.txt").write_text("yes/s3_nohash_0.wav\nstop/s3_nohash_0.wav\n")
    task = KeywordTask(data_dir=str(tmp_path))
    assert len(task.train_dataset()) == 7 and len(task.test_dataset()) == 2
    assert task.model_cfg.n_out == 10
    assert sorted(np.unique(task.train_groups()).tolist()) == [0, 1, 2]
    feats, _ = task.test_dataset()[0]
    assert feats.shape == (98, 40)  # 0.75 s clips padded to 1 s
