"""Shared fixtures: keep torch to the two cores CI has, and give each test a run folder."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
