"""The MobileLLM federated task: data, options, local training, LoRA, LayerSkip."""

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from fedge.tasks.base import TrainConfig
from fedge.tasks.mobilellm.data import ByteTokenizer, group_documents
from fedge.tasks.mobilellm.lora import LoRALinear, state_bytes, trainable_state
from fedge.tasks.mobilellm.model import save_hf_checkpoint
from fedge.tasks.registry import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return build_task("mobilellm", seq_len=32)


def test_windows_labels_and_groups(task):
    train, test = task.train_dataset(), task.test_dataset()
    labels = task.train_labels()
    assert len(labels) == len(train) and np.array_equal(labels, task.train_groups())
    assert set(labels.tolist()) == set(range(10)) and len(test) > 100
    x, y = train[5]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    names = [n for g in task.corpus.groups for n in g]
    assert names == sorted(names) and "assert" in task.corpus.groups[0]
    assert len(task.train_dataset(np.array([0, 3, 7]))) == 3


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve → 𝜋 ≈ 3.14"
    assert tok.decode(tok.encode(text)) == text and int(tok.encode(text).max()) < 256


def test_groups_are_contiguous_and_about_equal():
    docs = {f"d{i:02d}": "x" * 10 for i in range(20)}
    groups = group_documents(docs, 4)
    assert [len(g) for g in groups] == [5, 5, 5, 5] and groups[1][0] == "d05"


def test_text_files_from_data_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 200)
    task = build_task("mobilellm", data_dir=str(tmp_path), seq_len=16, num_groups=3)
    assert set(task.train_labels().tolist()) == {0, 1, 2}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.txt"):
        build_task("mobilellm", data_dir=str(tmp_path / "empty")).train_labels()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_task("mobilellm", data_dir=str(tmp_path / "missing")).train_labels()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown options \\['colour'\\]"):
        build_task("mobilellm", colour="red")
    with pytest.raises(ValueError, match="trainable"):
        build_task("mobilellm", trainable="half")
    with pytest.raises(ValueError, match="curriculum"):
        build_task("mobilellm", curriculum="spiral")
    with pytest.raises(ValueError, match="layer dropout curriculum 'linear'"):
        build_task("mobilellm", layer_dropout=0.1, dropout_curriculum="linear")


def local_run(task, steps, lr=0.2, group=3, model=None):
    model = model or task.build_model()
    test = Subset(task.test_dataset(), range(0, len(task.test_dataset()), 8))
    before = task.evaluate(model, test)["perplexity"]
    part = np.flatnonzero(task.train_labels() == group)
    report = task.train(
        model,
        task.train_dataset(part),
        TrainConfig(batch_size=16, lr=lr, momentum=0.9, max_steps=steps),
    )
    return model, before, task.evaluate(model, test)["perplexity"], report


def test_local_training_lowers_perplexity(task):
    model, before, after, report = local_run(task, steps=40)
    assert report.steps == 40 and before > 200 and after < before / 3


def test_lora_fine_tunes_a_pretrained_checkpoint_through_adapters_only(task, tmp_path):
    pretrained, _, _, _ = local_run(task, steps=60)
    save_hf_checkpoint(pretrained, tmp_path)
    lora = build_task("mobilellm", seq_len=32, config=str(tmp_path), trainable="lora")
    model = lora.build_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, base[k]) for k, v in pretrained.state_dict().items())
    shipped = trainable_state(model)
    assert shipped and all(k.endswith(("lora_a", "lora_b")) for k in shipped)
    assert state_bytes(shipped) < state_bytes(model.state_dict()) / 4
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * 6
    model, before, after, _ = local_run(lora, steps=30, lr=0.3, group=7, model=model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == set(shipped)
    assert after < before * 0.97


def test_lora_starts_from_a_runs_final_model(task, tmp_path):
    trained = task.build_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # anything but the fresh init
    torch.save(trained.state_dict(), tmp_path / "final_model.pt")
    init = str(tmp_path / "final_model.pt")
    model = build_task("mobilellm", seq_len=32, init=init, trainable="lora").build_model()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in trained.state_dict().items())
    with pytest.raises(ValueError, match="does not fit model config 'tiny-wide'"):
        build_task("mobilellm", seq_len=32, init=init, config="tiny-wide").build_model()
    with pytest.raises(ValueError, match="not a readable state_dict"):
        build_task("mobilellm", seq_len=32, init=str(tmp_path / "nope.pt")).build_model()


def test_layerskip_training_lowers_perplexity_at_every_exit():
    ls = build_task(
        "mobilellm", seq_len=32, layer_dropout=0.2, early_exit_scale=1.0, curriculum="rotational"
    )
    model, before, after, _ = local_run(ls, steps=40)
    assert ls.step == 40 and after < before / 3
    exits = ls.evaluate_exits(model, Subset(ls.test_dataset(), range(64)))
    assert sorted(exits) == list(range(1, 7)) and exits[6]["agreement"] == 1.0
    assert all(e["perplexity"] < 100 and 0 < e["agreement"] <= 1 for e in exits.values())
