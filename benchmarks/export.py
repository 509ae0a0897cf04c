"""Exported models in their device runtime against eager torch, one core each, one run.

For each task's tiny config and each format, fp32 and int8: the file's size, the latency of
one inference of one test sample (median of repeats), and the peak RSS of a fresh process
that loads the file and runs it (torch and fedge are imported in each, the same for all).
The peer is eager torch on the same core and sample. ASR also gives the real-time factor of
a whole utterance (latency / audio seconds, 10 ms feature hop).

    .venv/bin/python benchmarks/export.py                  # digits, kws, asr, mobilellm
    .venv/bin/python benchmarks/export.py --tasks digits asr --repeats 50
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TINY: dict[str, dict[str, Any]] = {
    "digits": {},
    "kws": dict(speakers=5, test_speakers=2, copies=2),
    "asr": dict(speakers=4, test_speakers=2, copies=2),
    "mobilellm": dict(seq_len=32),
}
HOP_SECONDS = 0.01


def sample(task: Any) -> tuple[torch.Tensor, ...]:
    """The first test sample, as a batch of one."""
    batch = next(iter(task.loader(task.test_dataset(), 1, shuffle=False)))
    return task.model_inputs(batch)


def measure(name: str, runtime: str, path: str, repeats: int, queue: Any) -> None:
    """In a fresh process: load the model in `runtime` on one core and time it."""
    from fedge.edge.export import onnx_format, pte_format
    from fedge.tasks import build_task

    torch.set_num_threads(1)
    task = build_task(name, **TINY[name])
    inputs = sample(task)
    if runtime == "torch":
        model = task.build_model().eval()
        model.load_state_dict(torch.load(path, weights_only=True))
    elif runtime == "onnx":
        model = onnx_format.Model(Path(path), threads=1)
    else:
        pte_format.set_threads(1)
        model = pte_format.Model(Path(path))
    times = []
    with torch.no_grad():
        try:
            model(*inputs)  # warm-up
        except RuntimeError as exc:  # the runtime logs why; the table says that it failed
            queue.put(str(exc))
            return
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    frames = int(inputs[1][0]) if name == "asr" else 0
    queue.put((statistics.median(times), peak, frames))


def run_child(*args: Any) -> tuple[float, float, int] | str:
    """`measure` in a fresh process: its timings, or why the runtime failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=measure, args=(*args, queue))
    child.start()
    result = queue.get(timeout=600)
    child.join()
    return result


def line(task: str, label: str, size: int, s: float, base: float, peak: float, frames: int) -> str:
    """One table row; ASR adds its real-time factor (latency / audio seconds)."""
    rtf = f"  RTF {s / (frames * HOP_SECONDS):.4f}" if frames else ""
    return (
        f"{task:10} {label:16} {size / 1024:9.1f} {s * 1e3:8.3f} {base / s:8.2f} {peak:9.0f}{rtf}"
    )


def main() -> None:
    from fedge.edge.export import ExportError, export_model
    from fedge.tasks import build_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TINY), choices=list(TINY))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    header = (
        f"{'task':10} {'runtime':16} {'size KiB':>9} {'ms/inf':>8} {'speedup':>8} {'peak MiB':>9}"
    )
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            task = build_task(name, **TINY[name])
            model = task.build_model().eval()
            weights = Path(tmp) / f"{name}.pt"
            torch.save(model.state_dict(), weights)
            result = run_child(name, "torch", str(weights), args.repeats)
            assert not isinstance(result, str), result
            base, peak, frames = result
            size = weights.stat().st_size
            rows.append(line(name, "torch eager", size, base, base, peak, frames))
            for fmt in ("executorch", "onnx"):
                for quantize in (None, "int8"):
                    out = Path(tmp) / f"{name}.{fmt}.{quantize}"
                    label = f"{fmt} {quantize or 'fp32'}"
                    try:
                        report = export_model(task, model, fmt, out, quantize=quantize)
                    except ExportError as exc:
                        rows.append(f"{name:10} {label:16} does not export: {str(exc)[:120]}")
                        continue
                    runtime = "onnx" if fmt == "onnx" else "executorch"
                    result = run_child(name, runtime, str(out), args.repeats)
                    if isinstance(result, str):
                        rows.append(f"{name:10} {label:16} fails on one sample: {result}")
                        continue
                    ms, peak, frames = result
                    rows.append(line(name, label, report.size_bytes, ms, base, peak, frames))
            print("\n".join(rows[-5:]), flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
