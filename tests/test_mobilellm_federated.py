"""MobileLLM through `simulate`: topic groups as clients (natural non-IID), two rounds."""

import torch

from fedge.config import RunConfig
from fedge.simulation import simulate
from fedge.tasks.registry import build_task


def test_two_federated_rounds_lower_perplexity(run_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    options = dict(seq_len=32, layer_dropout=0.1, early_exit_scale=1.0, curriculum="rotational")
    task = build_task("mobilellm", **options)
    before = task.evaluate(task.build_model(), task.test_dataset())["perplexity"]
    cfg = RunConfig.from_mapping(
        dict(
            task="mobilellm",
            task_options=options,
            partition="natural",
            num_clients=10,
            clients_per_round=2,
            rounds=2,
            local_epochs=1,
            batch_size=16,
            lr=0.2,
            momentum=0.9,
            eval_fraction=0.0,
            backend="local",  # in-process: no Ray cluster needed, deterministic
            out=str(run_dir),
        )
    )
    try:
        history = simulate(cfg)
    finally:
        torch.set_num_threads(threads)
    ppl = [r["perplexity"] for r in history]
    assert len(history) == 2 and all(r["num_clients"] == 2 for r in history)
    assert ppl[-1] < before / 3, (before, ppl)
