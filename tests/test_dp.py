"""Differential privacy: clients clip their update, the server adds noise, epsilon is reported."""

import math

import torch

from fedge.simulation import simulate
from fedge.strategies.dp import clip_update
from fedge.tasks import build_task


def test_clip_update_bounds_the_update_norm_and_keeps_small_ones():
    sent = {"w": torch.zeros(4), "steps": torch.tensor(3)}
    big = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "steps": torch.tensor(5)}
    clipped = clip_update(big, sent, clipping_norm=1.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert clipped["steps"].item() == 5  # integer buffers are not part of the update
    small = {"w": torch.tensor([0.1, 0.0, 0.0, 0.0]), "steps": torch.tensor(5)}
    torch.testing.assert_close(clip_update(small, sent, 1.0)["w"], small["w"])


def rdp_gaussian_epsilon(noise: float, releases: int, delta: float) -> float:
    """A textbook upper bound: Gaussian RDP T*a/(2 z^2), converted at the best order a."""
    orders = [1 + x / 10 for x in range(1, 1000)]
    return min(releases * a / (2 * noise**2) + math.log(1 / delta) / (a - 1) for a in orders)


def test_dp_run_reports_growing_epsilon_and_sends_clipped_updates(run_dir, small_run):
    clip, noise, delta = 0.5, 1.0, 1e-5
    cfg = small_run(run_dir, dp_noise=noise, dp_clip=clip, dp_delta=delta)
    history = simulate(cfg)
    eps = [r["dp_epsilon"] for r in history]
    assert 0 < eps[0] < eps[1] < math.inf
    for t, e in enumerate(eps, start=1):
        assert e <= rdp_gaussian_epsilon(noise, t, delta)  # dp-accounting is tighter
    assert all(r["dp_delta"] == delta for r in history)
    # round 1 started from the task's initial model: every client's update obeys the clip
    w0 = build_task("digits", model="mlp").build_model().state_dict()
    norm0 = math.sqrt(sum(float((v.double() ** 2).sum()) for v in w0.values()))
    assert history[0]["drift_max"] * norm0 <= clip * (1 + 1e-4)
