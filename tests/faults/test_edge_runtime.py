"""fedge's edge runtime under real processes on 127.0.0.1: `fedge server` and `fedge client`
(a SuperNode in `--isolation process` plus one warm ClientApp runtime per device)."""

import os
import re
import signal
import time

import pytest
from faultkit import device_pids, history_of, rounds_of, rss_mb, wait_until

from fedge.processes import free_port

MLP = ["--task-option", "model=mlp", "--local-epochs", "1"]


def client_flags(port: int, partition: int, partitions: int) -> list[str]:
    return ["--server", f"127.0.0.1:{port}", "--partition-id", str(partition)] + [
        "--num-partitions",
        str(partitions),
    ]


@pytest.mark.slow
def test_one_warm_process_answers_every_message_and_survives_a_raising_client_app(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "3", "--rounds", "3", "--eval-fraction", "1", *MLP]
    server = launch("server", "server", *flags, "--port", str(port), "--out", str(out))
    good = [launch(f"client{i}", "client", *client_flags(port, i, 3)) for i in (0, 1)]
    # started for another task: its ClientApp raises on every message of this run
    odd = launch("odd", "client", *client_flags(port, 2, 3), "--task", "kws")
    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]

    history = history_of(out)
    assert [r["round"] for r in history] == [1, 2, 3]
    for r in history:
        assert r["num_clients"] == 2 and r["failures"] == 1
        assert any("start the client with the server's --task" in f for f in r["failure_reasons"])
    for name in ("client0", "client1"):
        log = (logs / name).read_text()
        _, runtime = device_pids(logs / name)
        assert log.count("loaded its ClientApp") == 1, log[-2000:]
        answered = re.findall(r"message answered in [\d.]+ s; pid (\d+)", log)
        assert len(answered) == 6 and set(answered) == {str(runtime)}, log[-2000:]
        assert "started a new one" not in log
    log = (logs / "odd").read_text()
    assert len(re.findall(r"message failed \(ValueError: this client was started", log)) == 6
    assert "started a new one" not in log
    assert all(p.poll() is None for p in [*good, odd])  # devices stay up after the run


@pytest.mark.slow
def test_runtime_killed_with_sigkill_is_replaced_and_the_device_stays(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "2", "--rounds", "4", "--eval-fraction", "0", *MLP]
    server = launch("server", "server", *flags, "--port", str(port), "--out", str(out))
    clients = [launch(f"client{i}", "client", *client_flags(port, i, 2)) for i in (0, 1)]
    wait_until(lambda: history_of(out), 600, "first round", proc=server)
    _, runtime = device_pids(logs / "client0")
    os.kill(runtime, signal.SIGKILL)

    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]
    assert rounds_of(out) == [1, 2, 3, 4]
    log = (logs / "client0").read_text()
    assert f"the runtime (pid {runtime}) exited with status -9" in log
    assert "started a new one" in log
    assert history_of(out)[-1]["num_clients"] == 2  # the device kept its place
    assert all(c.poll() is None for c in clients)


@pytest.mark.slow
def test_device_memory_stays_flat_over_50_rounds(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "1", "--rounds", "50", "--eval-fraction", "1", *MLP]
    server = launch("server", "server", *flags, "--port", str(port), "--out", str(out))
    client = launch("client", "client", *client_flags(port, 0, 1))
    log = logs / "client"
    wait_until(lambda: all(device_pids(log)), 120, "device processes", proc=client)
    supernode, runtime = device_pids(log)
    rss: dict[int, float] = {}
    while server.poll() is None and len(rss) < 50:
        done = len(history_of(out))
        if done and done not in rss:
            rss[done] = rss_mb(runtime) + rss_mb(supernode)
        time.sleep(0.05)
    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]
    assert (
        device_pids(logs / "client")[1] == runtime
        and "started a new one" not in (logs / "client").read_text()
    )
    late, base = rss[max(rss)], rss[min(r for r in rss if r >= 5)]
    assert max(rss) >= 45 and late < 1.10 * base, rss


def test_unreachable_server_is_reported_within_10_s_with_a_growing_backoff(tmp_path, launch):
    port = free_port()  # nothing listens there
    client = launch("client", "client", *client_flags(port, 0, 2))
    started = time.monotonic()
    log = launch.logs / "client"
    wait_until(lambda: "retrying in 1 s" in log.read_text(), 10, "first report", proc=client)
    assert time.monotonic() - started < 10
    text = log.read_text()
    assert f"cannot join 127.0.0.1:{port}: nothing answers there" in text
    assert "refused" in text.lower()
    wait_until(lambda: "retrying in 2 s" in log.read_text(), 15, "backoff", proc=client)
    assert client.poll() is None  # it keeps trying


def test_insecure_client_against_a_tls_server_is_told_to_use_tls(tmp_path, launch):
    from fedge.server.certs import make_certs

    tls, port = make_certs(tmp_path / "tls"), free_port()
    server = launch(
        "server", "server", "--tls", str(tls), "--port", str(port), "--out", str(tmp_path / "run")
    )
    log = launch.logs / "server"
    wait_until(lambda: "listening" in log.read_text(), 120, "the SuperLink", proc=server)
    client = launch("client", "client", *client_flags(port, 0, 2))
    started, clog = time.monotonic(), launch.logs / "client"
    wait_until(lambda: "retrying in" in clog.read_text(), 10, "a report", proc=client)
    assert time.monotonic() - started < 10
    assert f"cannot join 127.0.0.1:{port}: the server speaks TLS" in clog.read_text()
    assert "--tls" in clog.read_text()


@pytest.mark.slow
def test_device_joining_after_round_2_is_sampled_from_the_next_round_on(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "2", "--rounds", "40", "--eval-fraction", "0", *MLP]
    server = launch("server", "server", *flags, "--port", str(port), "--out", str(out))
    clients = [launch(f"client{i}", "client", *client_flags(port, i, 2)) for i in (0, 1)]
    wait_until(lambda: len(history_of(out)) >= 2, 600, "round 2", proc=server)
    late = launch("late", "client", *client_flags(port, 1, 2))  # a second holder of part 1
    connected = "SuperNode ID"  # Flower's SuperNode, once the SuperLink has activated it
    wait_until(lambda: connected in (logs / "late").read_text(), 300, "the late join", late)
    joined_after = len(history_of(out))  # rounds done when it joined; the next may be running
    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]
    sizes = [r["num_clients"] for r in history_of(out)]
    assert joined_after >= 2 and joined_after + 2 <= len(sizes), (joined_after, sizes)
    assert all(s == 2 for s in sizes[:joined_after]), sizes
    assert all(s == 3 for s in sizes[joined_after + 1 :]), (joined_after, sizes)
    assert late.poll() is None and all(c.poll() is None for c in clients)


@pytest.mark.slow
def test_device_whose_supernode_is_frozen_for_20_s_comes_back(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "2", "--rounds", "4", "--eval-fraction", "0", *MLP]
    server = launch("server", "server", *flags, "--port", str(port), "--out", str(out))
    clients = [launch(f"client{i}", "client", *client_flags(port, i, 2)) for i in (0, 1)]
    wait_until(lambda: history_of(out), 600, "first round", proc=server)
    supernode, runtime = device_pids(logs / "client0")
    os.kill(supernode, signal.SIGSTOP)  # the device loses its network
    time.sleep(20)
    os.kill(supernode, signal.SIGCONT)

    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]
    history = history_of(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["num_clients"] == 2 and history[-1]["failures"] == 0
    assert max(r["seconds"] for r in history) >= 15  # a round waited for the frozen device
    assert device_pids(logs / "client0") == (supernode, runtime)  # nothing was restarted
    assert "started a new one" not in (logs / "client0").read_text()
    assert all(c.poll() is None for c in clients)
