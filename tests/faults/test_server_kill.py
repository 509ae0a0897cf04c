"""Fault: the server process is killed with SIGKILL mid-run; `--resume` loses no round."""

import os
import signal
import subprocess
import time

import torch
from faultkit import rounds_of

from fedge.cli import main
from fedge.processes import fedge_command
from fedge.simulation import simulate

ARGS = dict(num_clients=3, rounds=4, strategy="fedadam")


def test_kill_9_then_resume_holds_every_round_once(tmp_path, processes, small_run):
    killed = tmp_path / "killed"
    flags = ["--backend", "local", "--num-clients", "3", "--rounds", "4", "--strategy", "fedadam"]
    flags += ["--local-epochs", "1", "--eval-fraction", "0", "--task-option", "model=mlp"]
    proc = subprocess.Popen(
        fedge_command("run", *flags, "--out", str(killed)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(proc)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "history.json").exists() and len(rounds_of(killed)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = rounds_of(killed)
    assert 2 <= len(done) < 4

    assert main(["run", "--resume", str(killed)]) == 0
    assert rounds_of(killed) == [1, 2, 3, 4]

    # the resumed run ends where an uninterrupted one does (FedAdam's moments were restored)
    simulate(small_run(tmp_path / "straight", **ARGS))
    resumed = torch.load(killed / "final_model.pt")
    straight = torch.load(tmp_path / "straight" / "final_model.pt")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-4, rtol=0)
