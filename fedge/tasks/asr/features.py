"""Log-mel filterbank features computed with torch alone (torchaudio pins old torch builds).

Frames are not centred (`center=False`): frame t covers samples [t*hop, t*hop + n_fft), so a
feature frame never looks at audio after its own window and features stream chunk by chunk.
The mel scale is HTK's (2595 log10(1 + f/700)) with unnormalised triangular filters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureConfig:
    """16 kHz audio, 25 ms windows every 10 ms, 40 mel bands from 20 Hz to 7.6 kHz."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    f_min: float = 20.0
    f_max: float = 7600.0
    log_floor: float = 1e-6


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """Triangular filters, shape (n_fft // 2 + 1, n_mels): power spectrum @ fb = mel energies.

    Filter m rises linearly from mel point m to m+1 and falls to m+2, with n_mels + 2 points
    evenly spaced on the mel scale between f_min and f_max.
    """
    if not 0 <= cfg.f_min < cfg.f_max <= cfg.sample_rate / 2:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={cfg.f_min}, "
            f"f_max={cfg.f_max}, sample_rate={cfg.sample_rate}"
        )
    freqs = torch.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    hz = mel_to_hz(mels)
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    f = freqs[:, None]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Feature frames that `num_samples` of audio yield (0 if shorter than one window)."""
    return 0 if num_samples < cfg.n_fft else 1 + (num_samples - cfg.n_fft) // cfg.hop_length


class LogMel(nn.Module):
    """Waveform (..., samples) in [-1, 1] -> log-mel features (..., frames, n_mels)."""

    window: torch.Tensor  # buffers, registered in __init__
    fb: torch.Tensor

    def __init__(self, cfg: FeatureConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FeatureConfig()
        self.register_buffer("window", torch.hann_window(self.cfg.n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(self.cfg), persistent=False)

    def power_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Mel-band power (not logged), for comparison with other implementations."""
        if wave.shape[-1] < self.cfg.n_fft:
            raise ValueError(
                f"audio has {wave.shape[-1]} samples, fewer than one {self.cfg.n_fft}-sample "
                "window; pad it first"
            )
        lead = wave.shape[:-1]
        spec = torch.stft(
            wave.reshape(-1, wave.shape[-1]).float(),
            n_fft=self.cfg.n_fft,
            hop_length=self.cfg.hop_length,
            window=self.window,
            center=False,
            return_complex=True,
        )
        power = spec.real**2 + spec.imag**2  # (B, freq, frames)
        mel = power.transpose(1, 2) @ self.fb
        return mel.reshape(*lead, mel.shape[-2], mel.shape[-1])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power_mel(wave) + self.cfg.log_floor)
