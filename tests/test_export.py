"""Export for inference-only deployment: each task's tiny model in ExecuTorch and ONNX, run in
the device runtime and checked against torch; int8 on a trained model; operators a format
lacks named in the error; `fedge export` on a finished run."""

import json

import pytest
import torch
from torch import nn

from fedge.cli import main
from fedge.edge.export import ExportError, export_model, load_run
from fedge.simulation import simulate
from fedge.tasks import build_task
from fedge.tasks.base import TrainConfig
from fedge.tasks.digits import DigitsTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "kws": dict(speakers=5, test_speakers=2, copies=2),
    "asr": dict(speakers=4, test_speakers=2, copies=2),
    "mobilellm": dict(seq_len=32),
}
INT8_DROP = 0.02  # accuracy an int8 digits model may lose against torch


def assert_matches_torch(report, tolerance=1e-4):
    assert report.path.exists() and report.size_bytes == report.path.stat().st_size > 0
    assert report.max_abs_diff["fp32"] <= tolerance
    torch_metric = report.metrics["torch"][report.metric]
    assert report.metrics["fp32"][report.metric] == pytest.approx(torch_metric, abs=1e-3)


@pytest.mark.parametrize("fmt", ["executorch", "onnx"])
@pytest.mark.parametrize(
    "name",
    [
        "asr",
        pytest.param("kws", marks=pytest.mark.slow),
        pytest.param("mobilellm", marks=pytest.mark.slow),
    ],
)
def test_tiny_task_exports_and_matches_torch_in_the_runtime(tmp_path, name, fmt):
    task = build_task(name, **TINY[name])
    report = export_model(task, task.build_model(), fmt, tmp_path / f"model.{fmt}")
    assert_matches_torch(report)
    if name == "asr":  # utterances of different lengths: the frames dimension is dynamic
        assert len(report.bounds) == 2


@pytest.fixture(scope="module")
def trained_digits():
    task = DigitsTask()
    model = task.build_model()
    task.train(model, task.train_dataset(), TrainConfig(epochs=1, lr=0.05, momentum=0.9))
    return task, model


@pytest.mark.parametrize("fmt", ["executorch", "onnx"])
def test_int8_digits_model_keeps_its_accuracy(tmp_path, trained_digits, fmt):
    task, model = trained_digits
    report = export_model(task, model, fmt, tmp_path / "model", quantize="int8")
    assert_matches_torch(report)
    accuracy = report.metrics["torch"]["accuracy"]
    assert accuracy > 0.8
    assert report.metrics["int8"]["accuracy"] >= accuracy - INT8_DROP
    # int8 weights (a quarter of fp32's) plus scales, zero points and the graph
    assert report.size_bytes < 0.75 * sum(p.numel() * 4 for p in model.parameters())
    assert report.max_abs_diff["int8"] > 0  # quantized: not the fp32 model


class Eigh(nn.Module):
    """A model whose operator (a symmetric eigendecomposition) ONNX has no function for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


class EighTask(DigitsTask):
    def build_model(self) -> nn.Module:
        return Eigh()

    def model_inputs(self, batch):
        return (batch[0][:, 0],)


def test_an_operator_the_format_lacks_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="aten::linalg_eigh"):
        export_model(EighTask(), Eigh(), "onnx", out)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary folder left behind


def test_fedge_export_of_a_finished_run(tmp_path, small_run, capsys):
    run_dir = tmp_path / "run"
    simulate(small_run(run_dir, task_options={}, local_epochs=2, rounds=2))
    out = tmp_path / "digits.int8.pte"
    assert (
        main(
            [
                "export",
                str(run_dir),
                "--format",
                "executorch",
                "--quantize",
                "int8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0 and "int8" in printed and "max |diff|" in printed
    run = load_run(run_dir)  # the file runs the run's final model
    assert json.loads((run_dir / "config.json").read_text())["task"] == run.cfg.task == "digits"


def test_fedge_export_says_what_is_wrong(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"task": "digits"}))
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "final_model.pt does not exist" in capsys.readouterr().err
    torch.save(DigitsTask().build_model().state_dict(), tmp_path / "final_model.pt")
    assert main(["export", str(tmp_path), "--format", "tflite"]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err
