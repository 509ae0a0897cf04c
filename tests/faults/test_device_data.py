"""Devices that bring their own data: `fedge client --data-dir DIR`, no partition flags.
Real processes on 127.0.0.1; the device's files are MNIST IDX files the test writes."""

import sys
from pathlib import Path

import pytest
from faultkit import history_of

from fedge.processes import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_digits import make_mnist_dir  # noqa: E402


@pytest.mark.slow
def test_device_trains_on_its_own_folder_and_a_broken_one_fails_with_its_reason(tmp_path, launch):
    own, broken = tmp_path / "own", tmp_path / "broken"
    own.mkdir()
    broken.mkdir()
    make_mnist_dir(own, n_train=200, n_test=50, classes=5)  # digits 0-4 only
    (broken / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    flags = ["--num-clients", "2", "--rounds", "2", "--eval-fraction", "1"]
    flags += ["--task-option", "model=mlp", "--port", str(port), "--out", str(out)]
    server = launch("server", "server", *flags)
    server_at = ["--server", f"127.0.0.1:{port}", "--task", "digits"]
    devices = [
        launch("own", "client", *server_at, "--data-dir", str(own)),
        launch("broken", "client", *server_at, "--data-dir", str(broken)),
    ]
    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-3000:]

    history = history_of(out)
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["num_clients"] == 1 and r["failures"] == 1
        reasons = " ".join(r["failure_reasons"])
        assert "t10k-images-idx3-ubyte" in reasons or "not an unsigned-byte IDX" in reasons
        # label counts 0-4 only against the server's ten digits: EMD near 1
        assert 0.8 < r["emd_mean"] < 1.2
        assert r["fed_clients"] == 1  # the device evaluated on its folder's test split
    assert "its own data in" in (logs / "own").read_text()
    assert all(d.poll() is None for d in devices)


def test_device_without_data_or_partition_is_refused_in_one_line(tmp_path, launch):
    device = launch("device", "client", "--server", "127.0.0.1:9", "--task", "digits")
    assert device.wait(timeout=60) == 2
    said = (launch.logs / "device").read_text().strip().splitlines()
    assert said == [
        "fedge client: error: give --data-dir DIR (the device's own data) "
        "or --partition-id I --num-partitions N"
    ]
