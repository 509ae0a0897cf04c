"""SCAFFOLD and FedNova: the client halves, the server updates, and short runs that learn."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedge.client.app import app as client_app
from fedge.config import RunConfig
from fedge.server.app import sampling
from fedge.simulation import simulate
from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
from fedge.strategies import build_strategy
from fedge.strategies.fednova import NORM, local_norm
from fedge.strategies.scaffold import CLIENT_CONTROL, CONTROL, DELTA
from fedge.tasks import build_task
from fedge.wire import ClientSpec


def test_scaffold_client_and_server_control_variates():
    cfg = RunConfig(num_clients=10, partition="label-k:1", local_epochs=1, batch_size=100)
    grid = LocalGrid(client_app, num_nodes=10)
    strategy = build_strategy("scaffold", {}, sampling(cfg))
    weights = ArrayRecord(build_task("digits").build_model().state_dict())
    messages = list(
        strategy.configure_train(1, weights, ClientSpec.from_run(cfg).to_record(), grid)
    )
    content = messages[0].content
    assert content["config"]["algorithm"] == "scaffold"
    assert all(not v.numpy().any() for v in content[CONTROL].values())
    replies = list(grid.send_and_receive(messages))
    assert not any(r.has_error() for r in replies)
    deltas = [r.content[DELTA].to_torch_state_dict() for r in replies]
    # c_k started at 0, so its change is the new c_k: the mean raw gradient, kept in the state
    state = grid.context(NODE_ID_BASE).state[CLIENT_CONTROL].to_torch_state_dict()
    first = replies[[r.metadata.src_node_id for r in replies].index(NODE_ID_BASE)]
    assert all(np.array_equal(state[k].numpy(), first.content[DELTA][k].numpy()) for k in state)
    assert all(v.abs().sum() > 0 for v in deltas[0].values())
    sent_back = first.content["arrays"].count_bytes() + first.content[DELTA].count_bytes()
    assert first.content["metrics"]["update_bytes"] == sent_back  # the control delta counts too
    # with c = c_k = 0 the correction is zero: the client trained exactly as plain SGD does
    plain = RecordDict({"arrays": weights, "config": ClientSpec.from_run(cfg).to_record()})
    plain_grid = LocalGrid(client_app, num_nodes=10)
    (ref,) = plain_grid.send_and_receive([Message(plain, NODE_ID_BASE, MessageType.TRAIN)])
    got, want = first.content["arrays"], ref.content["arrays"]
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want)
    # full participation: c moves by the mean change of the clients' c_k
    strategy.aggregate_train(1, replies)
    for key in deltas[0]:
        mean = torch.stack([d[key] for d in deltas]).mean(0).numpy()
        assert np.allclose(strategy.control[key], mean, atol=1e-7)


def test_fednova_norm_matches_heavy_ball_sgd():
    for rho, tau in ((0.0, 7), (0.5, 7), (0.9, 20)):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1, momentum=rho)
        for _ in range(tau):
            opt.zero_grad()
            (3.0 * p).sum().backward()  # constant gradient 3
            opt.step()
        assert -p.item() == pytest.approx(0.1 * 3.0 * local_norm(tau, rho), rel=1e-5)


def test_fednova_aggregation_normalizes_by_local_work():
    cfg = RunConfig(num_clients=3)
    grid = LocalGrid(client_app, num_nodes=3)
    strategy = build_strategy("fednova", {}, sampling(cfg))
    x = {"w": torch.tensor([1.0, 1.0])}
    list(strategy.configure_train(1, ArrayRecord(x), ClientSpec.from_run(cfg).to_record(), grid))
    ws = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])]
    n, a = [10.0, 30.0, 60.0], [2.0, 4.0, 8.0]

    def reply(w, n_k, a_k):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": w}),
                "metrics": MetricRecord({"num-examples": n_k, NORM: a_k}),
            }
        )
        return Message(content, NODE_ID_BASE, MessageType.TRAIN)

    arrays, _ = strategy.aggregate_train(1, [reply(*t) for t in zip(ws, n, a, strict=True)])
    p = np.array(n) / sum(n)
    d = sum(p_i * (x["w"].numpy() - w.numpy()) / a_i for p_i, w, a_i in zip(p, ws, a, strict=True))
    expected = x["w"].numpy() - float(np.dot(p, a)) * d
    assert np.allclose(arrays["w"].numpy(), expected)
    # equal local work: FedNova is FedAvg
    arrays, _ = strategy.aggregate_train(
        1, [reply(w, n_k, 5.0) for w, n_k in zip(ws, n, strict=True)]
    )
    assert np.allclose(
        arrays["w"].numpy(), sum(p_i * w.numpy() for p_i, w in zip(p, ws, strict=True))
    )


@pytest.mark.parametrize(
    "strategy,partition", [("scaffold", "dirichlet:0.5"), ("fednova", "quantity:1.0")]
)
def test_short_non_iid_runs_learn(run_dir, strategy, partition):
    cfg = RunConfig.from_mapping(
        dict(
            strategy=strategy,
            partition=partition,
            num_clients=4,
            rounds=3,
            local_epochs=1,
            eval_fraction=0.0,
            backend="local",
            out=str(run_dir),
        )
    )
    history = simulate(cfg)
    assert history[-1]["accuracy"] > 0.6, [r["accuracy"] for r in history]
    assert all(r["failures"] == 0 for r in history)
