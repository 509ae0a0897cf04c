"""SecAgg+ (fedge.strategies.secagg): the sum is right, masked vectors look uniform, dropouts
at every stage are recovered, too few survivors fail the round, a malformed share excludes
its sender. The clients are a plain Flower ClientApp with the mod, on fedge's LocalGrid."""

from __future__ import annotations

import pickle
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from fedge.compat import error_reply
from fedge.errors import ConfigError
from fedge.server.observer import PassThroughGrid
from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
from fedge.strategies.secagg import SecAggPlus, secaggplus_mod
from fedge.strategies.secagg.masking import graph_degree, harary_graph
from fedge.wire import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_MASKED,
    SECAGG_STATE,
    SecAggKey,
    SecAggStage,
)

SHAPES = {"w": (3, 4), "b": (5,)}
STAGES = [SecAggStage.SETUP, SecAggStage.SHARE_KEYS, SecAggStage.COLLECT, SecAggStage.UNMASK]


def node_update(node: int) -> dict[str, np.ndarray]:
    """What node `node` adds to the model: fixed by its id, within the clip range."""
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def weight_of(node: int) -> int:
    return 10 + node % 7


def numpy_app(outer_mods: list | None = None) -> ClientApp:
    """Any Flower ClientApp: 'trains' by adding its update, reports its examples."""
    app = ClientApp(mods=[*(outer_mods or []), secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = msg.content.array_records[ARRAYS]
        update = node_update(context.node_id)
        arrays = ArrayRecord({k: Array(sent[k].numpy() + update[k]) for k in sent})
        metrics = MetricRecord({NUM_EXAMPLES: weight_of(context.node_id), "loss": 1.0})
        return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)

    return app


class DropGrid(PassThroughGrid):
    """Nodes in `drop` fail at protocol stage `stage`; `tamper` edits replies."""

    def __init__(self, grid: LocalGrid, stage: str = "", drop: Iterable[int] = ()) -> None:
        super().__init__(grid)
        self.stage, self.drop = stage, set(drop)
        self.masked: dict[int, np.ndarray] = {}  # what the server held of each client

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        keep = [m for m in messages if not self.dropped(m)]
        replies = list(self.grid.send_and_receive(keep, timeout=timeout))
        replies += [error_reply(m, "dropped out (test)") for m in messages if self.dropped(m)]
        for reply in replies:
            if reply.has_content() and SECAGG_MASKED in reply.content.array_records:
                vector = reply.content.array_records[SECAGG_MASKED][SecAggKey.VECTOR]
                self.masked[reply.metadata.src_node_id] = vector.numpy()
        return replies

    def dropped(self, message: Message) -> bool:
        return message.metadata.dst_node_id in self.drop and stage_of(message) == self.stage


def stage_of(message: Message) -> str:
    return str(message.content.config_records[SECAGG][SecAggKey.STAGE])


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, 0.25, np.float32)) for k, s in SHAPES.items()})


def one_round(
    n: int, grid_of=lambda g: g, app: ClientApp | None = None, **kw
) -> tuple[ArrayRecord | None, SecAggPlus, PassThroughGrid]:
    grid = grid_of(LocalGrid(app or numpy_app(), n))
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=n), **kw)
    messages = strategy.configure_train(1, initial(), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=60)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, strategy, grid


def fedavg_of(nodes: Iterable[int]) -> dict[str, np.ndarray]:
    nodes = list(nodes)
    total = sum(weight_of(u) for u in nodes)
    return {
        k: 0.25 + sum(weight_of(u) * node_update(u)[k].astype(np.float64) for u in nodes) / total
        for k in SHAPES
    }


def assert_close(arrays: ArrayRecord | None, expected: dict[str, np.ndarray], tol: float) -> None:
    assert arrays is not None
    for k, v in expected.items():
        np.testing.assert_allclose(arrays[k].numpy(), v, atol=tol, rtol=0)


def nodes(n: int) -> list[int]:
    return list(range(NODE_ID_BASE, NODE_ID_BASE + n))


def test_sum_equals_fedavg_within_quantization() -> None:
    bits, clip = 16, 1.0
    arrays, strategy, _ = one_round(8, quantization_bits=bits, clip_range=clip)
    step = 2 * clip / 2**bits  # one quantization level; stochastic rounding errs < 1 level
    assert_close(arrays, fedavg_of(nodes(8)), tol=step)
    assert strategy.report["secagg_aggregated"] == 8
    # with coarse quantization the error grows, as it must: the test above is not vacuous
    coarse, _, _ = one_round(8, quantization_bits=4, clip_range=clip)
    err = max(np.abs(coarse[k].numpy() - v).max() for k, v in fedavg_of(nodes(8)).items())
    assert step < err <= 2 * clip / 2**4


def test_sparse_graph_sum_and_degree() -> None:
    arrays, strategy, _ = one_round(30, degree=6, threshold=0.5)
    assert strategy.report["secagg_degree"] == 6
    assert strategy.report["secagg_threshold"] == 4  # ceil(0.5 x 7)
    assert_close(arrays, fedavg_of(nodes(30)), tol=1e-5)
    graph = harary_graph(range(100), 26)
    assert all(len(v) == 26 and u not in v for u, v in graph.items())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)  # undirected
    assert [graph_degree(n) for n in (10, 100, 1000, 10**5)] == [4, 26, 38, 48]  # O(log n)


def nibbles(words: np.ndarray) -> np.ndarray:
    """The 16 four-bit digits of each uint64 word."""
    shifts = np.arange(0, 64, 4, dtype=np.uint64)
    return ((words[:, None] >> shifts) & np.uint64(15)).astype(np.int64).ravel()


def test_server_holds_only_uniform_masked_vectors() -> None:
    """What the server holds of one client, its masked vector, over 12 rounds of the same
    input: a chi-square test finds its 4-bit digits uniform; the unmasked encoding of the
    same input fails the same test."""
    from scipy.stats import chisquare

    from fedge.strategies.secagg.masking import encode, flat_update

    seen = []
    for _ in range(12):
        _, _, grid = one_round(4, lambda g: DropGrid(g))
        seen.append(grid.masked[NODE_ID_BASE])
    masked = nibbles(np.concatenate(seen))  # 12 rounds x 18 words x 16 digits
    assert chisquare(np.bincount(masked, minlength=16)).pvalue > 1e-3
    moved = ArrayRecord(
        {k: Array(initial()[k].numpy() + v) for k, v in node_update(NODE_ID_BASE).items()}
    )
    plain = encode(flat_update(moved, initial()), weight_of(NODE_ID_BASE), 1.0, 24)
    digits = nibbles(np.tile(plain, 12))
    assert chisquare(np.bincount(digits, minlength=16)).pvalue < 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_each_stage_still_sum_right(stage: str) -> None:
    n, threshold = 6, 0.6  # complete graph: t = ceil(0.6 x 6) = 4, so up to n - t = 2 drop
    for lost in (1, 2):
        dropped = nodes(n)[:lost]
        arrays, strategy, _ = one_round(
            n, lambda g, d=dropped: DropGrid(g, stage, d), threshold=threshold, degree=5
        )
        assert strategy.report["secagg_threshold"] == 4
        # a client lost before its masked vector arrived is not in the sum; after, it is
        counted = nodes(n) if stage == SecAggStage.UNMASK else nodes(n)[lost:]
        assert_close(arrays, fedavg_of(counted), tol=1e-5)
        assert strategy.report["secagg_aggregated"] == len(counted)


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_t_survivors_fail_the_round(stage: str) -> None:
    arrays, strategy, _ = one_round(
        6, lambda g: DropGrid(g, stage, nodes(6)[:3]), threshold=0.6, degree=5
    )
    assert arrays is None  # nothing aggregated
    assert strategy.report["num_clients"] == 0
    assert "t = 4" in strategy.report["secagg_failure"]
    assert strategy.report["failure_reasons"][0] == strategy.report["secagg_failure"]
    pickle.dumps(strategy)  # the round's Grid and secrets are not kept: it checkpoints


def test_a_malformed_share_excludes_its_sender() -> None:
    bad = NODE_ID_BASE + 2

    def corrupt(msg: Message, context: Context, call_next) -> Message:
        out = call_next(msg, context)
        config = msg.content.config_records.get(SECAGG)
        if context.node_id == bad and config and config[SecAggKey.STAGE] == SecAggStage.SHARE_KEYS:
            texts = list(out.content.config_records[SECAGG][SecAggKey.CIPHERTEXTS])
            texts[0] = texts[0][:-8] + b"garbage!"
            out.content.config_records[SECAGG][SecAggKey.CIPHERTEXTS] = texts
        return out

    app = numpy_app(outer_mods=[corrupt])  # outside secaggplus_mod: edits what it sent
    arrays, strategy, _ = one_round(6, app=app, threshold=0.5, degree=5)
    assert_close(arrays, fedavg_of([u for u in nodes(6) if u != bad]), tol=1e-5)
    assert strategy.report["secagg_lost_excluded"] == 1
    assert strategy.report["secagg_aggregated"] == 5


def test_refuses_strategies_that_need_plain_updates() -> None:
    for strategy in (FedMedian(), Krum()):
        with pytest.raises(ConfigError, match="the server sees only the sum"):
            SecAggPlus(strategy)
    SecAggPlus(FedAdam())  # a weighted mean, then a server step: accepted
    from fedge.strategies.oort import with_oort

    SecAggPlus(with_oort(FedAvg(), {}))  # Oort only chooses the clients: accepted
    with pytest.raises(ConfigError, match="FedMedian"):
        SecAggPlus(with_oort(FedMedian(), {}))


# --- fedge's run: its ClientApp carries the mod; flags and refusals ---------------------
def test_fedges_client_app_answers_the_setup_stage() -> None:
    from flwr.app import ConfigRecord as Config

    from fedge.client.app import app
    from fedge.compat import claim_server_identity

    claim_server_identity(1)
    K = SecAggKey
    setup = Config({K.STAGE: SecAggStage.SETUP, K.ROUND: 1, K.NEIGHBOURS: [101, 102]})
    setup.update({K.THRESHOLD: 2, K.CLIP_RANGE: 1.0, K.QUANT_BITS: 24, K.MAX_WEIGHT: 10})
    setup[K.WEIGHT_KEY] = NUM_EXAMPLES
    message = Message(RecordDict({SECAGG: setup}), dst_node_id=100, message_type="train")
    context = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    reply = app(message, context)
    keys = reply.content.config_records[SECAGG]
    assert keys[K.PK_ENC].startswith(b"-----BEGIN PUBLIC KEY") and keys[K.PK_MASK] != keys[K.PK_ENC]
    assert SECAGG_STATE in context.state.config_records  # its secrets stay on the node


@pytest.mark.slow
def test_fedge_run_with_secure_aggregation_matches_plain(tmp_path, small_run) -> None:
    from fedge.simulation import simulate

    plain = simulate(small_run(tmp_path / "plain", num_clients=3, rounds=1))
    secure = simulate(
        small_run(tmp_path / "secure", num_clients=3, rounds=1, secure_aggregation=True)
    )
    for p, s in zip(plain, secure, strict=True):
        assert s["num_clients"] == p["num_clients"] == 3
        assert abs(s["accuracy"] - p["accuracy"]) <= 0.01  # the same model, up to 2^-24 steps
        assert s["secagg_aggregated"] == 3 and s["secagg_degree"] == 2


def test_cli_refuses_strategies_secure_aggregation_cannot_sum(tmp_path, capsys) -> None:
    from fedge.cli import main

    out = str(tmp_path / "run")
    assert main(["run", "--strategy", "fedmedian", "--secure-aggregation", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "median" in err and "fedavg" in err
    assert main(["server", "--strategy", "krum", "--secure-aggregation", "--out", out]) == 2
    assert "Krum" in capsys.readouterr().err
    assert main(["run", "--secure-aggregation", "--secagg-quantization", "40"]) == 2
    assert "secagg_quantization" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.slow
def test_ray_run_with_secure_aggregation_and_dp(tmp_path, small_run) -> None:
    """RayGrid keeps each node's protocol state between stages; DP's epsilon is reported."""
    import ray

    from fedge.simulation import simulate

    try:
        history = simulate(
            small_run(
                tmp_path / "ray",
                backend="ray",
                num_clients=12,
                clients_per_round=8,
                secure_aggregation=True,
                dp_noise=0.3,
                dp_clip=1.0,
            )
        )
    finally:
        ray.shutdown()
    assert [r["secagg_aggregated"] for r in history] == [8, 8]
    assert history[-1]["dp_epsilon"] > history[0]["dp_epsilon"] > 0


@pytest.mark.slow
def test_deployed_server_and_clients_aggregate_securely(deployed) -> None:
    """`fedge server --secure-aggregation` with three `fedge client` processes (fedge's warm
    runtime): the SuperNodes keep each client's protocol state between the stages."""
    flags = ["--rounds", "2", "--eval-fraction", "0", "--secure-aggregation"]
    history = deployed(flags, 3)
    assert [r["secagg_aggregated"] for r in history] == [3, 3]
    assert history[-1]["accuracy"] > 0.5  # chance is 0.1
