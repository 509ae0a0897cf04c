"""Helpers that write tiny audio fixtures for the speech tests."""

import wave
from pathlib import Path

import numpy as np


def write_wav(path: Path, x: np.ndarray, rate: int = 16000, channels: int = 1) -> None:
    """16-bit PCM WAV; `x` holds interleaved samples in [-1, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
