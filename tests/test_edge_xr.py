"""On-device co-scheduling: XRBench's scoring, the schedulers, the engine, and the round
budget a scheduler grants reaching the client."""

import math
import time

import pytest
import torch
from flwr.app import MessageType

from fedge.client.app import app as client_app
from fedge.client.app import train_config
from fedge.config import RunConfig
from fedge.edge.cosched import dep_frame, requests, run
from fedge.edge.device import TRAIN_STEP, Cost, Device, measure_ms, xr_device
from fedge.edge.scheduler import FCFS, SCHEDULERS, load_scheduler
from fedge.edge.xrbench import (
    XRBENCH_SCENARIOS,
    FrameRecord,
    ModelSpec,
    Scenario,
    energy_score,
    model_score,
    qoe_score,
    realtime_score,
    scenario,
    scenario_score,
    with_fedge_models,
)
from fedge.errors import ConfigError
from fedge.server.app import run_server
from fedge.simulation.scheduled import ScheduledGrid, SimulatedDevice
from fedge.wire import NODE_MAX_TRAIN_STEPS, ClientSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def one_unit(costs: dict[str, float], units: tuple[str, ...] = ("cpu",)) -> Device:
    """A device whose every unit runs every listed model at the given latency, 1 mJ/ms."""
    return Device("t", units, {m: {u: Cost(ms, ms) for u in units} for m, ms in costs.items()})


# --- scoring ---------------------------------------------------------------------------------
def test_realtime_score_is_one_half_exactly_at_the_deadline():
    assert realtime_score(100.0, 100.0) == 0.5
    assert realtime_score(90.0, 100.0) == pytest.approx(1.0, abs=1e-60)
    assert realtime_score(101.0, 100.0) == pytest.approx(1 / (1 + math.exp(15)))
    assert realtime_score(1e6, 0.0) == 0.0  # no overflow


def test_model_and_scenario_scores_match_a_hand_computed_case():
    recs = [
        FrameRecord("a", 0, 0, 100, 0, 100, "cpu", 150.0),  # at deadline: RT 0.5, energy 0.9
        FrameRecord("a", 1, 100, 200, 100, 200, "cpu", 150.0),  # at deadline
        FrameRecord("a", 2, 200, 300, 200, 250, "cpu", 150.0),  # 50 ms early: RT 1
        FrameRecord("a", 3, 300, 400, dropped=True),
    ]
    assert energy_score(150.0) == pytest.approx(0.9)
    assert qoe_score(recs) == 0.75
    # (0.5*0.9 + 0.5*0.9 + 1*0.9) / 4 frames * QoE 0.75 = 0.3375
    assert model_score(recs) == pytest.approx(0.3375)
    other = [FrameRecord("b", 0, 0, 10, 0, 5, "npu", 0.0)]  # perfect: 1.0
    assert scenario_score(recs + other) == pytest.approx(100 * (0.3375 + 1.0) / 2)


def test_a_dropped_frame_drops_the_frames_that_wait_on_it():
    # C holds u0 for 150 ms, so A's frame 0 (due 100) is dropped at 100; B's frame 0 waits on
    # it and goes with it at 100, long before its own deadline (200), though B has a unit.
    sc = Scenario("chain", (ModelSpec("C", 10), ModelSpec("A", 10), ModelSpec("B", 5, "A")))
    dev = Device(
        "t",
        ("u0", "u1"),
        {"C": {"u0": Cost(150, 1)}, "A": {"u0": Cost(1, 1)}, "B": {"u1": Cost(1, 1)}},
    )
    res = run(sc, dev, load_scheduler("fcfs"), horizon_ms=400)
    rec = {(r.model, r.frame): r for r in res.records}
    assert rec["A", 0].dropped and rec["A", 0].dropped_ms == pytest.approx(100.0, abs=1e-6)
    assert rec["B", 0].dropped and rec["B", 0].dropped_ms == pytest.approx(100.0, abs=1e-6)
    assert rec["B", 0].start_ms is None
    for (model, frame), r in rec.items():  # every B frame whose A frame was dropped
        if model == "B" and rec["A", 2 * frame].dropped:
            assert r.dropped and r.dropped_ms <= max(rec["A", 2 * frame].dropped_ms, 0) + 1e-6


def test_scenario_score_of_an_engine_run_is_recomputed_by_hand():
    sc = Scenario("one", (ModelSpec("m", 10),))
    res = run(sc, one_unit({"m": 30.0}), load_scheduler("edf"), horizon_ms=1000)
    assert len(res.records) == 10 and res.misses == 0
    expected = sum(
        realtime_score(r.finish_ms, r.deadline_ms) * energy_score(30.0) for r in res.records
    )
    assert res.score == pytest.approx(100 * expected / 10)


def test_the_accelerator_reproduces_xrbenchs_published_schedule_in_aggregate():
    # XRBench's VR-gaming schedule on 4K PEs: 1.503 + 4.222 + 8.562 ms, 277.69 mJ a frame set
    npu = xr_device({}, npu_pes=4096)
    models = ("ES_RITNet", "GE_FBNet_C", "HT_hand_graph_cnn_half")
    assert sum(npu.cost(m, "npu").latency_ms for m in models) == pytest.approx(14.2869, rel=1e-4)
    assert sum(npu.cost(m, "npu").energy_mj for m in models) == pytest.approx(277.685, rel=1e-4)
    assert xr_device({}).cost("ES_RITNet", "npu").latency_ms == pytest.approx(
        npu.cost("ES_RITNet", "npu").latency_ms / 2
    )


def test_measurement_takes_the_fastest_run_on_one_thread():
    threads = []

    def work():
        threads.append(torch.get_num_threads())
        time.sleep(0.003)

    ms = measure_ms({"w": work}, repeats=4, warmup=1)
    assert 3.0 <= ms["w"] < 50.0 and set(threads) == {1} and len(threads) == 5


# --- schedulers and the engine -------------------------------------------------------------
FEDGE_AR = with_fedge_models(XRBENCH_SCENARIOS["ar_assistant"], llm_fps=30)


def ar_device() -> Device:
    cpu = {"kws": 3.0, "asr_chunk": 2.0, "hrvit": 26.0, "llm_decode": 3.0, TRAIN_STEP: 12.0}
    costs = {m: {c: Cost(ms, 2 * ms) for c in ("cpu0", "cpu1")} for m, ms in cpu.items()}
    for m in ("DE_midas_v21_small", "PD_Plane_RCNN_Quarter", "OD_D2go_FasterRCNN"):
        costs[m] = {"npu": Cost(9.0, 300.0)}
    return Device("ar", ("cpu0", "cpu1", "npu"), costs)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("training", ["off", "always", "slack"])
def test_no_scheduler_starts_a_job_before_its_dependencies(name, training):
    res = run(FEDGE_AR, ar_device(), load_scheduler(name), 2000, training, seed=3)
    done = {(r.model, r.frame): r for r in res.records}
    checked = 0
    for r in res.records:
        dep = FEDGE_AR.model(r.model).depends_on
        if dep and r.start_ms is not None:
            parent = done[dep, dep_frame(FEDGE_AR.model(dep), r.injected_ms)]
            assert r.start_ms >= parent.finish_ms - 1e-9
            checked += 1
    assert checked > 0  # the cascade (kws -> asr -> llm) did run
    busy = sorted((u, s, e) for u, _, s, e in res.timeline)
    for (u1, _, e1), (u2, s2, _) in zip(busy, busy[1:], strict=False):
        assert u1 != u2 or s2 >= e1 - 1e-9  # one job at a time per unit


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_an_infeasible_scenario_reports_its_misses(name):
    sc = Scenario("overload", (ModelSpec("big", 30), ModelSpec("small", 60)))
    res = run(sc, one_unit({"big": 100.0, "small": 20.0}), load_scheduler(name), 1000)
    assert len(res.records) == len(requests(sc, 1000, 0)) == 30 + 60
    assert res.misses > 45 and res.drops > 0
    assert all(r.dropped or r.finish_ms is not None for r in res.records)


def test_dream_grants_no_step_that_would_cost_a_frame_its_deadline():
    # a 150 ms step never fits the 70 ms gap between frames; idle-time training misses
    sc = Scenario("tight", (ModelSpec("m", 10),))
    dev = one_unit({"m": 30.0, TRAIN_STEP: 150.0})
    fcfs = run(sc, dev, load_scheduler("fcfs"), 1000, "slack")
    dream = run(sc, dev, load_scheduler("dream"), 1000, "slack")
    assert fcfs.train_steps > 0 and fcfs.misses > 0
    assert dream.train_steps == 0 and dream.misses == 0
    wide = one_unit({"m": 30.0, TRAIN_STEP: 10.0})
    granted = run(sc, wide, load_scheduler("dream"), 1000, "slack")
    assert granted.train_steps > 10 and granted.misses == 0


def test_always_on_training_takes_its_unit_from_inference():
    sc = Scenario("one", (ModelSpec("m", 10),))
    dev = one_unit({"m": 30.0, TRAIN_STEP: 20.0})
    alone = run(sc, dev, load_scheduler("edf"), 1000)
    always = run(sc, dev, load_scheduler("edf"), 1000, "always")
    # the trainer holds the unit until the horizon (50 steps of 20 ms): every frame misses
    assert alone.misses == 0 and always.misses == 10 and always.train_steps == 50


def test_bad_input_gets_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown scheduler 'nope'"):
        load_scheduler("nope")
    with pytest.raises(ConfigError, match="not a fedge.edge.scheduler.Scheduler"):
        load_scheduler("fedge.edge.xrbench:Scenario")
    with pytest.raises(ConfigError, match="unknown scenario"):
        scenario("moon_walk")
    with pytest.raises(ConfigError, match="fps 0"):
        Scenario("s", (ModelSpec("m", 0),))
    with pytest.raises(ConfigError, match="unknown model 'x'"):
        Scenario("s", (ModelSpec("m", 10, "x"),))
    with pytest.raises(ConfigError, match="cycle"):
        Scenario("s", (ModelSpec("a", 10, "b"), ModelSpec("b", 10, "a")))
    with pytest.raises(ConfigError, match="probability"):
        Scenario("s", (ModelSpec("m", 10, None, 1.5),))
    sc = Scenario("s", (ModelSpec("m", 10),))
    with pytest.raises(ConfigError, match="no unit that runs"):
        run(sc, one_unit({"other": 1.0}), load_scheduler("fcfs"))
    with pytest.raises(ConfigError, match="training mode"):
        run(sc, one_unit({"m": 1.0}), load_scheduler("fcfs"), training="sometimes")


def test_a_plugged_in_scheduler_must_keep_the_rules():
    sc = Scenario("two", (ModelSpec("A", 10), ModelSpec("B", 10)))
    with pytest.raises(RuntimeError, match="busy or cannot run"):
        run(sc, one_unit({"A": 5.0, "B": 5.0}), load_scheduler("tests.test_edge_xr:Greedy"))


class Greedy(FCFS):
    """A broken plug-in: puts every ready job on the first unit."""

    def assign(self, ready, idle, state):
        return [(job, idle[0]) for job in ready] if idle else []


# --- the budget reaches the client -----------------------------------------------------------
def test_the_node_step_budget_wins_and_reaches_the_training_loop():
    sent = ClientSpec.from_run(RunConfig(max_train_steps=3)).to_record()
    assert train_config(ClientSpec.from_record(sent, {}), sent, 0).max_steps == 3
    mine = ClientSpec.from_record(sent, {NODE_MAX_TRAIN_STEPS: 7})
    assert train_config(mine, sent, 0).max_steps == 7


class RecordingGrid(ScheduledGrid):
    """Keeps every train reply beside the partition that sent it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def deliver(self, message):
        reply = super().deliver(message)
        if message.metadata.message_type == MessageType.TRAIN:
            self.replies.append((self.partition_of(message.metadata.dst_node_id), reply))
        return reply


def test_the_budget_a_scheduler_grants_is_what_the_client_trains(tmp_path, small_run):
    sc = Scenario("one", (ModelSpec("m", 10),))
    roomy = SimulatedDevice(sc, one_unit({"m": 30.0, TRAIN_STEP: 10.0}), "dream")
    full = SimulatedDevice(sc, one_unit({"m": 99.0, TRAIN_STEP: 10.0}), "dream")  # no slack
    grid = RecordingGrid(client_app, [roomy, roomy, full], window_ms=150.0)
    cfg = small_run(
        tmp_path / "run",
        num_clients=3,
        local_epochs=100,  # the step budget, not the epochs, ends training
        batch_size=8,
        task_options={"model": "mlp", "source": "sklearn"},
    )
    run_server(grid, cfg)
    granted = {(e["round"], e["device"]): e["steps"] for e in grid.log}
    assert len(grid.replies) == 6
    for i, (pid, reply) in enumerate(grid.replies):
        rnd = 1 + i // 3
        if pid == 2:
            assert granted[rnd, 2] == 0 and reply.has_error()
            assert "granted no training step" in reply.error.reason
        else:
            assert granted[rnd, pid] > 0
            assert reply.content["metrics"]["steps"] == granted[rnd, pid]
