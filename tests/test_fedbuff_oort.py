"""FedBuff's buffered asynchronous aggregation on RayGrid with the virtual clock, and the
Oort-style selector."""

import math
from pathlib import Path

import numpy as np
import pytest
import ray
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from test_devices_clock import clocked_run, speeds, write_trace

from fedge.compat import claim_server_identity, error_reply, set_message_id
from fedge.config import ConfigError, RunConfig
from fedge.simulation import simulate
from fedge.simulation.ray_grid import init_ray
from fedge.strategies import build_strategy
from fedge.strategies.fedbuff import FedBuff, InFlight, staleness_weight
from fedge.strategies.oort import Oort
from fedge.wire import METRICS, NUM_EXAMPLES, TRAIN_LOSS_SQUARED, VIRTUAL_SECONDS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_fedbuff_step_is_the_papers_staleness_weighted_mean() -> None:
    """w <- w + eta_g (1/K) sum 1/sqrt(1 + staleness) Delta."""
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    strategy = FedBuff(buffer_size=2, server_lr=0.5)
    strategy.sent, strategy.version = {"w": np.zeros(3, dtype=np.float32)}, 2
    fresh = InFlight(
        1.0, 1, 100, 2, {"w": np.ones(3, dtype=np.float32)}, MetricRecord({NUM_EXAMPLES: 1})
    )
    stale = InFlight(
        2.0, 2, 101, 0, {"w": np.full(3, 2.0, dtype=np.float32)}, MetricRecord({NUM_EXAMPLES: 1})
    )
    arrays, _ = strategy.step([fresh, stale])
    expected = 0.5 * (1.0 + 2.0 / math.sqrt(3)) / 2
    assert arrays["w"].numpy() == pytest.approx(np.full(3, expected))
    assert strategy.staleness == [0, 2] and strategy.version == 3 and strategy.now == 2.0


@pytest.mark.parametrize(
    "backend",
    ["local", pytest.param("ray", marks=pytest.mark.slow)],  # ray: ~1 min on 2 cores
)
def test_fedbuff_orders_updates_by_virtual_arrival(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Devices 0-3 take 6, 12, 18, 24 s; 4 train at once, K = 2. Round 1 applies 0 and 1
    (t = 12); they restart. Round 2: 2 (from version 0) and 0 (version 1) arrive at 18.
    Round 3: 3 (version 0) and 1 (version 1) at 24. The same on RayGrid and in-process."""
    if backend == "ray":
        request.getfixturevalue("local_ray")
    trace = write_trace(tmp_path / "t.csv", speeds(4))
    cfg = clocked_run(
        tmp_path / "run",
        trace,
        backend=backend,
        strategy="fedbuff",
        strategy_options={"buffer_size": 2},
        num_clients=4,
        clients_per_round=4,
        rounds=3,
    )
    history = simulate(cfg)
    assert [r["virtual_time"] for r in history] == pytest.approx([12, 18, 24], rel=1e-6)
    assert [r["staleness_counts"] for r in history] == [[2], [1, 1], [0, 1, 1]]
    assert [r["model_version"] for r in history] == [1, 2, 3]
    assert [r["num_clients"] for r in history] == [4, 2, 2]  # new clients each round
    assert [r["in_flight"] for r in history] == [2, 2, 2]
    assert history[-1]["loss"] < history[0]["loss"]


def test_fedbuff_is_selectable_and_checks_its_options() -> None:
    strategy = build_strategy("fedbuff", {"buffer_size": 3, "server_lr": 0.8}, {})
    assert isinstance(strategy, FedBuff) and strategy.buffer_size == 3
    with pytest.raises(Exception, match="buffer_size must be >= 1"):
        build_strategy("fedbuff", {"buffer_size": 0}, {})


def instruction(node: int) -> Message:
    claim_server_identity(1)  # as the simulation grids do, to make messages here
    msg = Message(RecordDict(), node, MessageType.TRAIN)
    set_message_id(msg, f"m{node}")
    return msg


def metrics_reply(node: int, **metrics: float) -> Message:
    """A training reply from `node` carrying `metrics`."""
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=instruction(node))


def test_oort_utility_penalty_and_pacer() -> None:
    oort = Oort(FedAvg(), epsilon=0.0, epsilon_min=0.0, window=1, round_percentile=50)
    fast, slow = list(range(100, 104)), list(range(104, 110))
    replies = [
        metrics_reply(n, **{NUM_EXAMPLES: 4, TRAIN_LOSS_SQUARED: 9.0, VIRTUAL_SECONDS: 1.0})
        for n in fast
    ] + [
        metrics_reply(n, **{NUM_EXAMPLES: 4, TRAIN_LOSS_SQUARED: 9.0, VIRTUAL_SECONDS: 100.0})
        for n in slow
    ]
    replies.append(error_reply(instruction(110), "past the deadline"))
    oort.feedback(1, replies)
    assert oort.utility[100] == 12.0  # |B| sqrt(mean loss^2) = 4 x 3
    assert oort.utility[110] == 0.0  # failed: explored, no utility
    assert oort.preferred == 100.0  # the median of the round times (six at 100 s)
    oort.preferred = 10.0  # slow clients now pay (10 / 100)^2
    assert sorted(oort.select(2, 4, fast + slow + [110])) == fast
    # with eps = 1 every slot explores clients never tried
    explorer = Oort(FedAvg(), epsilon=1.0, epsilon_min=1.0)
    explorer.feedback(1, replies[:2])
    assert sorted(explorer.select(2, 3, [100, 101, 120, 121, 122])) == [120, 121, 122]
    # pacer (W = 1): exploited utility fell, so T grows by one step
    oort.exploited, step = {100}, oort.pacer_step
    oort.feedback(2, [metrics_reply(100, **{NUM_EXAMPLES: 4, TRAIN_LOSS_SQUARED: 9.0})])
    assert oort.preferred == 10.0  # utility 12 after 0: no change
    oort.feedback(3, [metrics_reply(100, **{NUM_EXAMPLES: 4, TRAIN_LOSS_SQUARED: 1.0})])
    assert oort.preferred == pytest.approx(10.0 + step)  # 4 after 12


def test_oort_run_avoids_slow_devices(tmp_path: Path) -> None:
    """Four devices 100x slower than eight others: once explored, Oort stops picking them,
    so its rounds take less virtual time than random selection's."""
    rows = [
        {"client_id": i, "computation": 1000 if i < 4 else 10, "communication": 1e9}
        for i in range(12)
    ]
    trace = write_trace(tmp_path / "t.csv", rows)
    totals = {}
    for selection in ("random", "oort"):
        cfg = clocked_run(
            tmp_path / selection,
            trace,
            selection=selection,
            num_clients=12,
            clients_per_round=4,
            rounds=8,
        )
        history = simulate(cfg)
        totals[selection] = history[-1]["virtual_time"]
    assert history[-1]["oort_explored"] == 12
    assert totals["oort"] < 0.7 * totals["random"]


def test_fedbuff_screens_faulty_updates_as_synchronous_rounds_do(tmp_path: Path) -> None:
    """Half the clients send a NaN weight: the server's validation rejects them before they
    enter the buffer, and the global model stays finite."""
    trace = write_trace(tmp_path / "t.csv", speeds(4))
    cfg = clocked_run(
        tmp_path / "run",
        trace,
        strategy="fedbuff",
        strategy_options={"buffer_size": 1},
        faults="nan:0.5",
        num_clients=4,
        clients_per_round=4,
        rounds=3,
    )
    history = simulate(cfg)
    assert sum(r["rejected"] for r in history) >= 2
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["model_version"] == 3


def test_oort_options_are_checked_before_the_run(tmp_path: Path) -> None:
    for options, message in (
        ({"alpa": 2}, "unknown option 'alpa' \\(did you mean 'alpha'\\?\\)"),
        ({"epsilon": 2}, "oort needs 0 <= epsilon_min <= epsilon <= 1"),
    ):
        cfg = RunConfig.from_mapping(
            {
                "task": "synthetic",
                "selection": "oort",
                "selection_options": options,
                "backend": "local",
                "out": str(tmp_path / "run"),
            }
        )
        with pytest.raises(ConfigError, match=f"^selection_options: {message}"):
            simulate(cfg)
    assert not (tmp_path / "run").exists()
