"""Fault: the newest checkpoint is truncated; `--resume` falls back a round and redoes it."""

import torch
from faultkit import rounds_of

from fedge.cli import main
from fedge.simulation import simulate


def test_resume_skips_a_truncated_checkpoint(tmp_path, capsys, small_run):
    out = tmp_path / "run"
    simulate(small_run(out, rounds=3))
    newest = out / "checkpoints" / "round_003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    assert main(["run", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round_003.pt is missing or damaged" in printed
    assert "resuming" in printed and "after round 2 of 3" in printed
    assert rounds_of(out) == [1, 2, 3]
    restored = torch.load(newest)  # rewritten whole by the redone round
    assert set(restored) == set(torch.load(out / "checkpoints" / "round_002.pt"))


def test_resume_of_a_finished_run_changes_nothing(tmp_path, small_run):
    out = tmp_path / "run"
    simulate(small_run(out, rounds=2))
    before = (out / "history.json").read_bytes()
    assert main(["run", "--resume", str(out)]) == 0
    assert (out / "history.json").read_bytes() == before
