"""A quick digits run for tests that need a whole federated run but not a good model."""

from fedge.config import RunConfig


def small_run(out, **kw) -> RunConfig:
    """Digits on the in-process grid: an MLP, 4 clients, 2 rounds of one local epoch, no
    federated evaluation; `kw` overrides any field."""
    base = dict(
        backend="local",
        num_clients=4,
        rounds=2,
        local_epochs=1,
        eval_fraction=0,
        task_options={"model": "mlp"},
        out=str(out),
    )
    return RunConfig.from_mapping({**base, **kw})
