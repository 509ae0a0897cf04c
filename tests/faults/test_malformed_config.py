"""Fault: a malformed config. The command exits with status 2 and one line naming what is
wrong, before touching anything; a bad flag on `--resume` leaves the run's files as they were."""

import subprocess

from fedge.cli import main
from fedge.processes import fedge_command
from fedge.simulation import simulate


def test_bad_toml_and_bad_values_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [oops\n")
    done = subprocess.run(fedge_command("run", "--config", str(bad)), capture_output=True)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not valid TOML" in lines[0]

    bad.write_text('rounds = "five"\nfaults = "nan:2"\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "rounds: expected an integer" in capsys.readouterr().err
    assert main(["run", "--faults", "meltdown:0.1", "--out", str(tmp_path / "never")]) == 2
    assert "unknown fault 'meltdown'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_bad_flag_on_resume_loses_nothing(tmp_path, capsys, small_run):
    out = tmp_path / "run"
    simulate(small_run(out, rounds=1))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(out), "--rounds", "0"]) == 2
    assert "rounds: must be >= 1" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["run", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "no config.json there" in capsys.readouterr().err
