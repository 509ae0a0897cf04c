"""End to end: two real PIR server processes on 127.0.0.1 serve a PrivateEmbeddingClient."""

import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fedge.privacy.dpf import VERSION
from fedge.privacy.service import SERVICE, PrivateEmbeddingClient, encode_request
from fedge.processes import PIRServerProcess, fedge_command


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pir")
    rng = np.random.default_rng(0)
    table = rng.standard_normal((3001, 24)).astype(np.float16)
    other = table.copy()
    other[17, 3] += 1
    np.save(root / "table.npy", table)
    np.save(root / "other.npy", other)
    procs = {}
    try:  # real `fedge pir-server` processes, started together
        for name, path, party in (("a", "table", 0), ("b", "table", 1), ("c", "other", 1)):
            procs[name] = PIRServerProcess(root / f"{path}.npy", party)
        yield table, {name: p.address() for name, p in procs.items()}, procs
    finally:
        for proc in procs.values():
            proc.stop()


def test_client_fetches_exact_rows(servers):
    table, addr, _ = servers
    ids = [0, 3000, 17, 17, 1024, 2047, 5]
    with PrivateEmbeddingClient([addr["a"], addr["b"]]) as client:
        rows = client.fetch(ids)
        assert rows.dtype == np.float16 and rows.shape == (7, 24)
        assert rows.tobytes() == table[ids].tobytes()
        many = np.random.default_rng(1).integers(0, 3001, 700)  # more than one RPC batch
        assert client.fetch(many).tobytes() == table[many].tobytes()
        with pytest.raises(IndexError, match="out of range"):
            client.fetch([3001])
        with pytest.raises(ValueError, match="must be integers, got 3.7"):
            client.fetch([3.7])
        with pytest.raises(ValueError, match="flat sequence"):
            client.fetch(np.zeros((2, 3), np.int64))
        assert client.fetch([17.0]).tobytes() == table[[17]].tobytes()


def test_concurrent_clients_share_passes_and_get_their_own_rows(servers):
    table, addr, _ = servers
    rng = np.random.default_rng(2)
    wanted = [rng.integers(0, 3001, 1 + i % 3) for i in range(24)]
    with PrivateEmbeddingClient([addr["a"], addr["b"]]) as client:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(client.fetch, wanted))
    for ids, rows in zip(wanted, got, strict=True):
        assert rows.tobytes() == table[ids].tobytes()


def test_table_mismatch_and_swapped_parties(servers):
    _, addr, _ = servers
    with pytest.raises(ValueError, match="table mismatch"):
        PrivateEmbeddingClient([addr["a"], addr["c"]])
    with pytest.raises(ValueError, match="party-0 server first"):
        PrivateEmbeddingClient([addr["b"], addr["a"]])


def test_server_rejects_malformed_keys(servers):
    _, addr, _ = servers
    with grpc.insecure_channel(addr["a"]) as channel:
        answer = channel.unary_unary(f"/{SERVICE}/Answer")
        with pytest.raises(grpc.RpcError) as info:
            answer(
                encode_request([b"DP" + bytes([VERSION]) + b"\x00\x0c" + b"\x00" * 40]), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be" in info.value.details()
        with pytest.raises(grpc.RpcError, match="not a PIR request"):
            answer(b"garbage-bytes-here", timeout=10)


def test_down_server_is_named(servers):
    _, addr, _ = servers
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"{dead} did not answer"):
        PrivateEmbeddingClient([addr["a"], dead], timeout=0.5)


def test_sigterm_stops_cleanly(servers):
    _, _, procs = servers
    proc = procs["c"].proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_missing_table_is_a_clear_error(tmp_path):
    run = subprocess.run(
        fedge_command("pir-server", "--table", str(tmp_path / "no.npy"), "--party", "0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "existing .npy file" in run.stderr


def test_serve_reports_its_port_to_ready_and_stops_on_sigint(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(40, dtype=np.int8).reshape(10, 4))
    code = (
        "from fedge.privacy.service import serve\n"
        f"serve({str(tmp_path / 't.npy')!r}, 1, ready=lambda p: print('ready', p, flush=True))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        listening, ready = proc.stdout.readline().split(), proc.stdout.readline().split()
        assert listening[:4] == ["pir-server", "party", "1", "listening"]
        assert listening[6:8] == ["rows=10", "width=4"]
        assert ready == ["ready", listening[5].rsplit(":", 1)[1]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_server_process_that_does_not_start_says_why(tmp_path):
    server = PIRServerProcess(tmp_path / "no.npy", 0)
    with pytest.raises(RuntimeError, match="party 0 did not start: .*existing .npy file"):
        server.address()
    assert server.proc.poll() is not None  # stopped


def test_a_busy_port_and_a_file_that_is_no_npy_are_clear_errors(servers, tmp_path, capsys):
    from fedge.cli import main

    table, addresses, _ = servers
    np.save(tmp_path / "t.npy", table)
    host, port = addresses["a"].rsplit(":", 1)  # party 0 listens there already
    args = ["pir-server", "--table", str(tmp_path / "t.npy"), "--party", "0"]
    assert main([*args, "--host", host, "--port", port]) == 2
    assert f"cannot listen on {host}:{port}" in capsys.readouterr().err
    text = tmp_path / "text.npy"
    text.write_text("1,2,3\n")
    assert main(["pir-server", "--table", str(text), "--party", "0", "--port", "0"]) == 2
    assert "not a numpy .npy array" in capsys.readouterr().err
