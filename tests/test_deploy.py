"""Real processes: `fedge server` plus three `fedge client`s on 127.0.0.1."""

import json
import subprocess

import pytest

from fedge.processes import fedge_command

FEDGE = fedge_command()


def test_server_and_three_client_processes_run_three_rounds(deployed):
    history = deployed(["--task", "digits", "--rounds", "3"], 3)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["num_clients"] == 3 and r["failures"] == 0 for r in history)
    assert history[-1]["accuracy"] > 0.6  # chance is 0.1


def test_client_with_bad_arguments_exits_with_a_clear_error():
    result = subprocess.run(
        [*FEDGE, "client", "--server", "nohost", "--partition-id", "0", "--num-partitions", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr


def test_a_resumed_server_listens_where_the_run_did_unless_told_otherwise(tmp_path):
    from fedge.errors import ConfigError
    from fedge.server.deploy import LISTEN_FILE, listen_settings

    nothing = {"host": None, "port": None, "tls_dir": None, "auth": None}
    assert listen_settings(str(tmp_path), True, nothing)["port"] == 9092  # nothing saved yet
    (tmp_path / "state").mkdir()
    saved = {"host": "0.0.0.0", "port": 9311, "tls_dir": "pki", "auth": True}
    (tmp_path / "state" / LISTEN_FILE).write_text(json.dumps(saved))
    assert listen_settings(str(tmp_path), True, nothing) == saved
    assert listen_settings(str(tmp_path), True, {**nothing, "port": 9400})["port"] == 9400
    assert listen_settings(str(tmp_path), False, nothing)["port"] == 9092  # a new run: defaults
    (tmp_path / "state" / LISTEN_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="damaged.*give --port"):
        listen_settings(str(tmp_path), True, nothing)
