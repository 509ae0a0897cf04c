"""Faults on the Ray backend, where clients are processes: a client process killed
mid-round, a client slower than the round timeout, a client that raises."""

import pytest

from fedge.simulation import simulate


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    from fedge.simulation.ray_grid import init_ray, ray

    init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture
def ray_run(small_run):
    """A small run on the Ray backend, half a CPU a client."""
    return lambda out, **kw: small_run(out, backend="ray", client_cpus=0.5, **kw)


def test_killed_client_process_does_not_stop_the_run(tmp_path, ray_run):
    history = simulate(ray_run(tmp_path, num_clients=4, rounds=2, faults="exit:0.25"))
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert record["failures"] >= 1  # the killed one (and any client sharing its actor)
        assert any("client actor died" in why for why in record["failure_reasons"])
        assert record["num_clients"] >= 1
    assert history[-1]["accuracy"] > 0.5


def test_slow_client_is_cut_off_by_the_round_timeout(tmp_path, ray_run):
    history = simulate(
        ray_run(tmp_path, num_clients=4, rounds=2, faults="slow=60:0.25", round_timeout=10)
    )
    for record in history:
        assert record["failures"] == 1 and record["num_clients"] == 3
        assert "no reply within the round timeout" in record["failure_reasons"][0]
        assert record["seconds"] < 40  # the round did not wait for the slow client
    assert history[-1]["accuracy"] > 0.5


def test_raising_client_is_a_failure_not_a_crash(tmp_path, small_run):
    history = simulate(small_run(tmp_path, num_clients=4, rounds=2, faults="crash:0.25"))
    assert [r["failures"] for r in history] == [1, 1]
    assert all("simulated client crash" in r["failure_reasons"][0] for r in history)
