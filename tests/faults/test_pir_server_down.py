"""Fault: one of the two PIR servers is killed mid-session. The client's fetch fails with an
error naming the dead server (never a wrong row); with the server back, fetches are exact."""

import numpy as np
import pytest

from fedge.privacy.service import PrivateEmbeddingClient
from fedge.processes import PIRServerProcess


def test_fetch_names_the_dead_server_then_recovers(tmp_path):
    table = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    np.save(tmp_path / "table.npy", table)
    servers = [PIRServerProcess(tmp_path / "table.npy", party) for party in (0, 1)]
    try:
        a, b = (s.address() for s in servers)
        client = PrivateEmbeddingClient([a, b], timeout=5)
        np.testing.assert_array_equal(client.fetch([3, 999]), table[[3, 999]])

        servers[1].proc.kill()
        servers[1].proc.wait()
        with pytest.raises(ConnectionError, match=b):
            client.fetch([5])

        servers.append(PIRServerProcess(tmp_path / "table.npy", 1))  # restarted, on a new port
        client = PrivateEmbeddingClient([a, servers[-1].address()], timeout=5)
        np.testing.assert_array_equal(client.fetch([5, 0]), table[[5, 0]])
    finally:
        for server in servers:
            server.stop()
