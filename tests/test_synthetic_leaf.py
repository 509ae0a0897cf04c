"""FedProx's Synthetic(alpha, beta) at any population, and LEAF's JSON datasets."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.config import ConfigError, RunConfig
from fedge.simulation import simulate
from fedge.tasks.registry import build_task
from fedge.tasks.synthetic import DIM, device_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_devices_follow_fedprox_model() -> None:
    """Device k depends only on (seed, k); sizes are lognormal(4, 2) + 50; each device's labels
    come from its own model, so devices differ in label distribution under alpha = beta = 1."""
    x, y = device_data(3, 12345, 1.0, 1.0, False)
    x2, y2 = device_data.__wrapped__(3, 12345, 1.0, 1.0, False)  # uncached: drawn again
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.shape == (len(y), DIM) and len(y) >= 50 and y.min() >= 0 and y.max() < 10
    sizes = np.array([len(device_data(0, k, 1.0, 1.0, False)[1]) for k in range(400)])
    # log(n - 50) of lognormal(4, 2) has mean 4, sd 2 (floored: a little lower)
    logs = np.log(np.maximum(sizes - 50, 1))
    assert 3.4 < logs.mean() < 4.4 and 1.6 < logs.std() < 2.4
    # the input scale falls with the coordinate as j^-0.6 (Sigma_jj = j^-1.2) about v_k
    big = device_data(0, int(np.argmax(sizes)), 1.0, 1.0, False)[0]
    sd = big.std(axis=0)
    assert sd[0] / sd[59] == pytest.approx(60**0.6, rel=0.25)
    heads = [
        np.bincount(device_data(0, k, 1.0, 1.0, False)[1], minlength=10).argmax() for k in range(30)
    ]
    assert len(set(heads)) >= 4  # non-IID: devices' majority classes differ


def test_synthetic_population_of_100000_runs_and_learns(tmp_path: Path) -> None:
    """`fedge run --task synthetic --num-clients 100000` runs (a client's data is drawn when
    it is sampled), and with 10 device models
    shared by the population the global model learns (far above the majority class, ~0.2)."""
    cfg = RunConfig.from_mapping(
        dict(
            task="synthetic",
            task_options={"models": 10},
            backend="local",
            num_clients=100_000,
            clients_per_round=10,
            rounds=4,
            local_epochs=1,
            batch_size=10,
            lr=0.02,
            max_train_steps=20,
            eval_fraction=0.3,
            out=str(tmp_path / "run"),
        )
    )
    history = simulate(cfg)
    assert len(history) == 4 and history[-1]["num_clients"] == 10
    assert history[-1]["accuracy"] > 0.4  # the majority class is about 0.2
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["fed_clients"] == 3  # the clients' own evaluation splits


def test_synthetic_refuses_a_pool_setting(tmp_path: Path) -> None:
    for field, value in (("partition", "dirichlet:0.5"), ("shared_fraction", 0.1)):
        cfg = RunConfig.from_mapping(
            {"task": "synthetic", "backend": "local", field: value, "out": str(tmp_path)}
        )
        with pytest.raises(ConfigError, match=f"^{field}: task synthetic makes each client"):
            simulate(cfg)


def write_leaf(root: Path, users: dict[str, tuple[list, list]], split: str) -> None:
    """One LEAF JSON file in root/split, in LEAF's layout."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    (folder / "data_0.json").write_text(json.dumps(data))


def femnist_users(rng: np.random.Generator, n_users: int, n: int) -> dict[str, tuple[list, list]]:
    """Writers of two classes: class c has ink in the top (0) or bottom (1) half."""
    users = {}
    for u in range(n_users):
        y = rng.integers(0, 2, n)
        x = np.ones((n, 28, 28), dtype=np.float32)
        for i, c in enumerate(y):
            rows = slice(0, 14) if c == 0 else slice(14, 28)
            x[i, rows, 4:24] = rng.uniform(0, 0.3, (14, 20))
        users[f"f{u:04d}_{u}"] = (x.reshape(n, -1).round(3).tolist(), y.tolist())
    return users


def test_femnist_from_leaf_json_learns_by_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_leaf(tmp_path, femnist_users(rng, 4, 64), "train")
    write_leaf(tmp_path, femnist_users(rng, 2, 20), "test")
    task = build_task("femnist", data_dir=str(tmp_path))
    assert np.bincount(task.train_groups()).tolist() == [64] * 4  # one group per LEAF user
    cfg = RunConfig.from_mapping(
        dict(
            task="femnist",
            data_dir=str(tmp_path),
            partition="natural",
            backend="local",
            num_clients=4,
            rounds=2,
            local_epochs=2,
            batch_size=8,
            lr=0.01,
            eval_fraction=0,
            out=str(tmp_path / "run"),
        )
    )
    history = simulate(cfg)
    assert history[-1]["accuracy"] >= 0.9


def test_shakespeare_and_sent140_read_leaf_records(tmp_path: Path) -> None:
    shakes = {"ROMEO": (["to be or not to b", "o be or not to be"], ["e", " "])}
    write_leaf(tmp_path / "s", shakes, "train")
    write_leaf(tmp_path / "s", shakes, "test")
    task = build_task("shakespeare", data_dir=str(tmp_path / "s"))
    x, y = task.train_dataset()[0]
    assert x.shape == (17,) and int(y) == task.train_split[1][0]
    model = task.build_model()
    assert model(task.train_split[0]).shape == (2, 80)
    tweets = {
        "u1": ([["1", "d", "q", "u1", "so happy today"], ["2", "d", "q", "u1", "sad"]], [1, 0])
    }
    write_leaf(tmp_path / "t", tweets, "train")
    write_leaf(tmp_path / "t", tweets, "test")
    task = build_task("sent140", data_dir=str(tmp_path / "t"))
    assert task.train_split[0].shape == (2, 4096) and task.train_split[0][0].sum() == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"users": ["a"]}', "missing \\['user_data'\\]"),
        ('{"users": ["a"], "user_data": {"a": {"x": [[0.0]], "y": []}}}', "1 x but 0 y"),
        ("{not json", "not valid JSON"),
    ],
)
def test_leaf_bad_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "d.json").write_text(content)
    with pytest.raises(ConfigError, match=f"task femnist: .*{message}"):
        build_task("femnist", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task femnist: .*no LEAF \\*.json files"):
        build_task("femnist", data_dir=str(tmp_path / "nowhere"))
