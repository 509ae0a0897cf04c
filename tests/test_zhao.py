"""simulations/zhao_noniid.py: its plan covers the paper's comparisons, finished runs are
skipped only when they match, and the tables compute what they claim."""

import importlib.util
import json
from pathlib import Path

import pytest

from fedge.config import RunConfig

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "zhao_noniid.py"


@pytest.fixture(scope="module")
def zhao():
    spec = importlib.util.spec_from_file_location("zhao_noniid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_covers_the_papers_comparisons(zhao):
    base = zhao.base_settings("digits", quick=False)
    plan = zhao.accuracy_plan("digits", base)
    for key in ("iid", "label-k:2", "label-k:1", "label-k:1+G0.05", "label-k:1+G0.1"):
        assert key in plan
    assert plan["label-k:1+G0.2"][1]["shared_fraction"] == 0.2
    assert {plan[f"label-k:1/{s}"][1]["strategy"] for s in zhao.STRATEGIES} == {
        "fedprox",
        "scaffold",
        "fednova",
    }
    assert plan["iid@seed2"][1]["seed"] == 2 and plan["iid@seed2"][0] == "digits-iid-s2"
    names = [name for name, _ in plan.values()]
    assert len(names) == len(set(names))  # every run has its own folder

    sweep = zhao.divergence_plan("kws", zhao.base_settings("kws", quick=False), quick=False)
    assert len(sweep) == len(zhao.STARTS) * len(zhao.DIV_PARTITIONS) * len(zhao.DIV_SEEDS)
    assert all(s["track_divergence"] for *_, s in sweep)
    warm = [s for start, *_, s in sweep if start == "warm"]
    assert all(s["shared_per_client"] == 0.0 and s["warmup_epochs"] > 0 for s in warm)


def test_finished_runs_are_reused_only_when_complete_and_matching(zhao, tmp_path):
    settings = dict(zhao.base_settings("digits", quick=True), partition="iid")
    out = tmp_path / "digits-iid"
    assert zhao.finished(out, settings) is None  # nothing there
    out.mkdir()
    cfg = RunConfig.from_mapping({**settings, "out": str(out)})
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    history = [{"round": r + 1, "accuracy": 0.5} for r in range(cfg.rounds)]
    (out / "history.json").write_text(json.dumps(history[:-1]))
    assert zhao.finished(out, settings) is None  # interrupted: one round short
    (out / "history.json").write_text(json.dumps(history))
    assert zhao.finished(out, settings) == history
    assert zhao.finished(out, {**settings, "lr": 0.5}) is None  # other settings: run again


def test_divergence_table_ranks_partitions_by_emd(zhao):
    rows = [
        {
            "start": start,
            "partition": p,
            "seed": seed,
            "emd": emd,
            "online": [emd / 10],
            "divergence": [emd / 10 + seed * 1e-3],
            "sgd_noise": [0.01],
            "layers": {"fc": emd / 10},
        }
        for start in ("cold", "warm")
        for p, emd in (("iid", 0.1), ("dirichlet:0.1", 1.2), ("label-k:1", 1.8))
        for seed in (0, 1)
    ]
    lines, summary = zhao.divergence_table("digits", rows)
    assert summary["cold/mean-of-SGD/r1"] == pytest.approx(1.0)
    assert summary["warm/online/r1/all-runs"] == pytest.approx(1.0)
    assert any("| cold | label-k:1 | 1.80 | 0.1805 ± 0.0005 |" in line for line in lines)


def test_accuracy_table_drop_and_recovery(zhao):
    def run(acc):
        return [{"round": 1, "accuracy": acc, "emd_mean": 1.0}]

    accuracy = {
        "iid": run(0.9),
        "label-k:1": run(0.1),
        "label-k:1+G0.05": run(0.5),
        "iid@seed1": run(0.8),
        "label-k:1@seed1": run(0.2),
        "label-k:1+G0.05@seed1": run(0.6),
    }
    lines, summary = zhao.accuracy_table("digits", accuracy)
    assert summary["seed 0"]["drop"] == pytest.approx(80.0)
    assert summary["seed 0"]["recovered"] == pytest.approx(0.5)
    assert summary["seed mean"]["drop"] == pytest.approx(70.0)  # 85 - 15
    assert summary["seed mean"]["recovered"] == pytest.approx(40 / 70)
    assert any("85.0 ± 5.0 (2)" in line for line in lines)
