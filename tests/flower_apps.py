"""Flower App folders in the shape of `flwr new`'s templates (Message API), written by tests.

`write_app(root, kind)` writes one: `numpy` (a NumPy app whose clients pull the model toward
their own partition and count their rounds in Context.state) or `pytorch` (a PyTorch MLP on
seeded synthetic data, with a custom strategy of its own, `DampedFedAvg`). Both read their
run config as the templates do and save the final arrays to the run config's `out-file`;
they are deterministic once `min-nodes` is the population (Flower's simulation may start a
round before all its SuperNodes are registered, and FedAvg samples those it has). Each
kind has its own package name, so several folders of different kinds can be imported by
one process.
"""

from pathlib import Path
from textwrap import dedent

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A Flower / {framework} app"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedge-tests"

[tool.flwr.app.components]
serverapp = "{name}.server_app:app"
clientapp = "{name}.client_app:app"

[tool.flwr.app.config]
{config}
"""

NUMPY_CONFIG = """\
num-server-rounds = 3
fraction-train = 1.0
min-nodes = 2
lr = 0.1
local-steps = 1
out-file = "final.npz"
"""

NUMPY_TASK = '''\
"""npapp: A Flower / NumPy app."""

import numpy as np


def get_dummy_model() -> list[np.ndarray]:
    return [np.ones((2, 3)), np.zeros(3)]


def train(arrays, partition_id, lr, steps, rounds_seen):
    """Deterministic local training: pull the model toward this partition's value; a node
    that trained before (its Context.state says how often) adds a little more."""
    for _ in range(steps):
        arrays = [a + lr * (partition_id + 1 - a) + 0.01 * rounds_seen for a in arrays]
    return arrays, float(sum(np.mean((a - partition_id - 1) ** 2) for a in arrays))
'''

NUMPY_CLIENT = '''\
"""npapp: A Flower / NumPy app."""

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from npapp.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    seen = context.state.config_records.get("seen", ConfigRecord({"rounds": 0}))
    arrays, loss = train_fn(
        msg.content["arrays"].to_numpy_ndarrays(),
        partition_id,
        msg.content["config"]["lr"],
        context.run_config["local-steps"],
        seen["rounds"],
    )
    seen["rounds"] = int(seen["rounds"]) + 1
    context.state["seen"] = seen
    metrics = MetricRecord({"train_loss": loss, "num-examples": partition_id + 1})
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    _, loss = train_fn(arrays, partition_id, 0.0, 1, 0)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": partition_id + 1})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
'''

NUMPY_SERVER = '''\
"""npapp: A Flower / NumPy app."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from npapp.task import get_dummy_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds: int = context.run_config["num-server-rounds"]
    fraction_train: float = context.run_config["fraction-train"]
    lr: float = context.run_config["lr"]

    strategy = FedAvg(
        fraction_train=fraction_train, min_available_nodes=context.run_config["min-nodes"]
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_dummy_model()),
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )
    np.savez(context.run_config["out-file"], *result.arrays.to_numpy_ndarrays())
'''

TORCH_CONFIG = """\
num-server-rounds = 2
fraction-train = 1.0
min-nodes = 2
fraction-evaluate = 0.5
local-epochs = 1
lr = 0.05
damping = 0.5
out-file = "final_model.pt"
"""

TORCH_TASK = '''\
"""torchapp: A Flower / PyTorch app."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32 synthetic samples per partition, the same every time for the same partition."""
    gen = torch.Generator().manual_seed(1000 * num_partitions + partition_id)
    x = torch.randn(32, 4, generator=gen) + partition_id / num_partitions
    return x, (x.sum(dim=1) > 0.5).long()


def train(net: Net, data, epochs: int, lr: float) -> float:
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for i in range(0, len(x), 8):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[i : i + 8]), y[i : i + 8])
            loss.backward()
            opt.step()
    return float(loss)


def test(net: Net, data) -> tuple[float, float]:
    x, y = data
    with torch.no_grad():
        logits = net(x)
    accuracy = float((logits.argmax(1) == y).float().mean())
    return float(nn.functional.cross_entropy(logits, y)), accuracy
'''

TORCH_CLIENT = '''\
"""torchapp: A Flower / PyTorch app."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from torchapp.task import Net, load_data
from torchapp.task import test as test_fn
from torchapp.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train_fn(model, data, context.run_config["local-epochs"], msg.content["config"]["lr"])
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(data[0])})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, accuracy = test_fn(model, data)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(data[0])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
'''

TORCH_STRATEGY = '''\
"""torchapp: a strategy of the app's own: FedAvg that moves only part way to the average."""

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg


class DampedFedAvg(FedAvg):
    def __init__(self, damping: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.damping = damping
        self.current: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.current is not None:
            old, new = self.current.to_torch_state_dict(), arrays.to_torch_state_dict()
            arrays = ArrayRecord({k: old[k] + self.damping * (new[k] - old[k]) for k in new})
        return arrays, metrics
'''

TORCH_SERVER = '''\
"""torchapp: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from torchapp.strategy import DampedFedAvg
from torchapp.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    global_model = Net()
    strategy = DampedFedAvg(
        damping=context.run_config["damping"],
        fraction_train=context.run_config["fraction-train"],
        fraction_evaluate=context.run_config["fraction-evaluate"],
        min_available_nodes=context.run_config["min-nodes"],
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_model.state_dict()),
        train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        num_rounds=context.run_config["num-server-rounds"],
    )
    torch.save(result.arrays.to_torch_state_dict(), context.run_config["out-file"])
'''

KINDS = {
    "numpy": (
        "npapp",
        "NumPy",
        NUMPY_CONFIG,
        {"task": NUMPY_TASK, "client_app": NUMPY_CLIENT, "server_app": NUMPY_SERVER},
    ),
    "pytorch": (
        "torchapp",
        "PyTorch",
        TORCH_CONFIG,
        {
            "task": TORCH_TASK,
            "client_app": TORCH_CLIENT,
            "server_app": TORCH_SERVER,
            "strategy": TORCH_STRATEGY,
        },
    ),
}


def write_app(root: Path, kind: str) -> Path:
    """A Flower App folder of `kind` (numpy, pytorch) under `root`; returns the folder."""
    name, framework, config, modules = KINDS[kind]
    folder = root / f"{name}-app"
    package = folder / name
    package.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        PYPROJECT.format(name=name, framework=framework, config=config)
    )
    (folder / "README.md").write_text(f"# {name}\n")
    (package / "__init__.py").write_text(f'"""{name}: A Flower / {framework} app."""\n')
    for module, source in modules.items():
        (package / f"{module}.py").write_text(dedent(source))
    return folder
