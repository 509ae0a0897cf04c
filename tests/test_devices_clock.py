"""Device populations and the virtual clock: profiles, FedScale's round time, deadlines,
over-selection, availability, and bad traces refused before any work."""

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.cli import main
from fedge.config import ConfigError, RunConfig
from fedge.simulation import simulate
from fedge.simulation.devices import DAY, DeviceModel, generate, load_devices

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_NET = 1e9  # kbit/s: transfer time negligible next to compute


def test_generated_population_is_seeded_lognormal_and_diurnal() -> None:
    model = DeviceModel()
    a, b = generate(20_000, model, seed=1), generate(20_000, model, seed=1)
    assert np.array_equal(a.speed_ms, b.speed_ms) and np.array_equal(a.window_start, b.window_start)
    assert not np.array_equal(a.speed_ms, generate(20_000, model, seed=2).speed_ms)
    logs = np.log(a.speed_ms)
    assert np.median(a.speed_ms) == pytest.approx(model.speed_ms, rel=0.05)
    assert logs.std() == pytest.approx(model.speed_sigma, rel=0.05)
    night, noon = a.online(23 * 3600).mean(), a.online(13 * 3600).mean()
    assert night > 0.5 and noon < 0.1  # windows of ~8 h start around 22:00
    assert a.online(23 * 3600 + DAY).mean() == night  # availability repeats daily


def test_round_seconds_is_fedscale_completion_time(tmp_path: Path) -> None:
    """compute = 3 x examples x ms/sample; transfer = bits / kbit/s, each way."""
    trace = tmp_path / "capacity.json"
    trace.write_text(json.dumps({"0": {"computation": 10.0, "down_kbps": 8000, "up_kbps": 4000}}))
    devices = load_devices(str(trace), 1, {}, seed=0)
    # 3 x 100 x 10 ms = 3 s; 1e6 B = 8000 kbit: 1 s down at 8000 kbit/s, 2 s up at 4000
    assert devices.round_seconds(0, 100, 1e6, 1e6) == pytest.approx(6.0)


def write_trace(path: Path, rows: list[dict[str, Any]]) -> str:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def clocked_run(out: Path, trace: str, **kw: Any) -> RunConfig:
    """Synthetic on the in-process grid: each client trains exactly 4 steps of 5 samples."""
    base = dict(
        task="synthetic",
        task_options={"models": 4, "test_devices": 4},
        backend="local",
        devices=trace,
        rounds=2,
        local_epochs=1,
        batch_size=5,
        max_train_steps=4,
        eval_fraction=0,
        max_failed_rounds=0,
        out=str(out),
    )
    return RunConfig.from_mapping({**base, **kw})


def speeds(n: int, **extra: Any) -> list[dict[str, Any]]:
    """Device i: 100 (i + 1) ms per sample, so 3 x 20 samples take 6 (i + 1) s."""
    return [
        {"client_id": i, "computation": 100 * (i + 1), "communication": FAST_NET, **extra}
        for i in range(n)
    ]


def test_over_selection_keeps_the_k_fastest(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", speeds(6))
    cfg = clocked_run(tmp_path / "run", trace, num_clients=6, clients_per_round=3, over_select=2)
    history = simulate(cfg)
    for r, record in enumerate(history, 1):
        assert record["num_clients"] == 3 and record["stragglers"] == 3
        assert record["round_virtual_seconds"] == pytest.approx(18.0, rel=1e-3)  # 3rd fastest
        assert record["virtual_time"] == pytest.approx(18.0 * r, rel=1e-3)
        assert record["dropped"] == 0


def test_deadline_drops_late_devices_and_the_round_waits_for_it(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", speeds(8))
    cfg = clocked_run(
        tmp_path / "run", trace, num_clients=8, clients_per_round=4, over_select=2, deadline=20
    )
    history = simulate(cfg)
    last = history[-1]
    assert last["num_clients"] == 3 and last["dropped"] == 5  # 6, 12, 18 s make it
    assert last["virtual_time"] == pytest.approx(40.0)  # two rounds that lasted the deadline
    assert any("past the deadline" in r for r in last["failure_reasons"])


def test_unavailable_devices_are_not_sampled_and_the_clock_waits(tmp_path: Path) -> None:
    # devices 0-3 always online (6-24 s); 4-7 fast but online only in [5000, 6000) of 10^4 s
    rows = speeds(4) + [
        {
            "client_id": i,
            "computation": 1,
            "communication": FAST_NET,
            "active": "5000",
            "inactive": "6000",
            "finish_time": 10_000,
        }
        for i in range(4, 8)
    ]
    trace = write_trace(tmp_path / "t.csv", rows)
    history = simulate(clocked_run(tmp_path / "a", trace, num_clients=8, clients_per_round=4))
    assert [r["online"] for r in history] == [4, 4]
    assert [r["round_virtual_seconds"] for r in history] == pytest.approx([24.0, 24.0], rel=1e-3)
    # all four windowed: nobody online at 0, the clock moves to the window's start
    windowed = write_trace(tmp_path / "w.csv", rows[4:])
    history = simulate(clocked_run(tmp_path / "b", windowed, num_clients=4, clients_per_round=2))
    assert history[0]["waited_virtual_seconds"] == 5040.0  # the first 60 s step past 5000
    assert history[0]["virtual_time"] > 5040.0


def test_out_of_memory_fails_the_round_with_the_reason(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", speeds(2, memory_mb=1))
    cfg = clocked_run(tmp_path / "run", trace, num_clients=2, rounds=1)
    record = simulate(cfg)[0]
    assert record["num_clients"] == 0 and record["out_of_memory"] == 2
    assert all("ran out of memory (simulated)" in r for r in record["failure_reasons"])


@pytest.mark.parametrize(
    ("rows", "fields", "message"),
    [
        ([{"client_id": 0, "computation": 5}], {}, "device 0 has no communication"),
        ([{"client_id": 0, "computation": -5, "communication": 10}], {}, "computation must be > 0"),
        (speeds(2), {"num_clients": 3}, "has 2 devices but num_clients is 3"),
        (speeds(2), {"num_clients": 2, "deadline": 0.1}, "no device can finish a round in 0.1 s"),
    ],
)
def test_bad_traces_fail_before_any_work(
    tmp_path: Path, rows: list[dict[str, Any]], fields: dict[str, Any], message: str
) -> None:
    trace = write_trace(tmp_path / "t.csv", rows)
    cfg = clocked_run(tmp_path / "run", trace, **{"num_clients": 1, **fields})
    with pytest.raises(ConfigError, match=message):
        simulate(cfg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_clock_settings_need_devices() -> None:
    with pytest.raises(ConfigError, match="^deadline: needs the virtual clock"):
        RunConfig.from_mapping({"deadline": 10})
    with pytest.raises(ConfigError, match="^over_select: samples more clients"):
        RunConfig.from_mapping({"devices": "generated", "num_clients": 4, "over_select": 2})


def test_cli_reports_time_to_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "run",
        "--task",
        "synthetic",
        "--task-option",
        "models=4",
        "--backend",
        "local",
        "--devices",
        "generated",
        "--num-clients",
        "1000",
        "--clients-per-round",
        "10",
        "--over-select",
        "1.3",
        "--rounds",
        "2",
        "--max-train-steps",
        "10",
        "--lr",
        "0.02",
        "--eval-fraction",
        "0",
        "--target-accuracy",
        "0.05",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "time to accuracy 0.05: round 1, " in out and "s of virtual time" in out
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert all(r["stragglers"] == 3 for r in history)  # ceil(1.3 x 10) - 10
    assert history[0]["virtual_time"] > 0
    assert main([*argv[:-4], "--deadline", "0.001", "--out", str(tmp_path / "s")]) == 2
    assert "deadline: no device can finish a round" in capsys.readouterr().err


def test_fedscale_json_trace_with_behaviour(tmp_path: Path) -> None:
    """FedScale's client_device_capacity as JSON (ids sorted numerically), with its behave
    trace's active/inactive/finish_time merged into a record."""
    trace = tmp_path / "capacity.json"
    trace.write_text(
        json.dumps(
            {
                "10": {"computation": 30.0, "communication": 1000.0},
                "2": {
                    "computation": 162.0,
                    "communication": 5648.1,
                    "active": [100, 500],
                    "inactive": [200, 600],
                    "finish_time": 1000,
                },
            }
        )
    )
    devices = load_devices(str(trace), 2, {"compute_factor": 2.0}, seed=0)
    assert devices.speed_ms.tolist() == [162.0, 30.0]  # client 2 is device 0
    assert devices.up_kbps.tolist() == devices.down_kbps.tolist() == [5648.1, 1000.0]
    assert [devices.online(t).tolist() for t in (50, 150, 550, 1150)] == [
        [False, True],
        [True, True],
        [True, True],
        [True, True],
    ]
    assert devices.round_seconds(1, 10, 0, 0) == pytest.approx(2 * 10 * 30 / 1000)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"speed": 3}, "unknown option 'speed' \\(did you mean 'speed_ms'\\?\\)"),
        ({"speed_ms": -1}, "speed_ms must be > 0"),
        ({"online_hours": 30}, "online_hours must be in \\(0, 24\\]"),
    ],
)
def test_bad_device_options_fail_before_any_work(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    cfg = clocked_run(tmp_path / "run", "generated", num_clients=10, device_options=options)
    with pytest.raises(ConfigError, match=f"^device_options: {message}"):
        simulate(cfg)
    assert not (tmp_path / "run").exists()
