"""Log-mel features against closed-form tones and librosa (a test-only reference)."""

import math

import librosa
import numpy as np
import pytest
import torch

from fedge.tasks.asr.features import FeatureConfig, LogMel, hz_to_mel, mel_filterbank, num_frames


def tone(freq: float, seconds: float, sr: int) -> torch.Tensor:
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    return (0.5 * torch.sin(2 * math.pi * freq * t)).float()


def test_matches_librosa_on_noise_and_speechlike_signal():
    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, 16000).astype(np.float32)
    x += 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    ref = librosa.feature.melspectrogram(
        y=x,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        window="hann",
        center=False,
        power=2.0,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=True,
        norm=None,
    ).T
    ours = LogMel(cfg).power_mel(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (num_frames(16000, cfg), cfg.n_mels)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6 * ref.max())


def test_filterbank_matches_librosa():
    cfg = FeatureConfig()
    ref = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=True,
        norm=None,
    ).T
    np.testing.assert_allclose(mel_filterbank(cfg).numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_tone_energy_lands_in_its_mel_band(freq):
    """A sine's power (A^2/4 * sum(window^2) per rfft bin pair) peaks in the band centred on it."""
    cfg = FeatureConfig()
    feats = LogMel(cfg)(tone(freq, 0.5, cfg.sample_rate))
    band = int(feats.mean(0).argmax())
    edges = torch.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    centre = float(edges[band + 1])
    spacing = float(edges[1] - edges[0])
    assert abs(centre - float(hz_to_mel(freq))) <= spacing
    # Total mel power is bounded by the tone's spectral power, 2 * (A/2)^2 * sum(w^2) / 2.
    w = torch.hann_window(cfg.n_fft)
    expected = (0.5**2 / 4) * float((w**2).sum()) * cfg.n_fft
    peak = float(LogMel(cfg).power_mel(tone(freq, 0.5, cfg.sample_rate)).sum(-1).mean())
    assert 0.3 * expected < peak < 1.05 * expected


def test_short_audio_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one"):
        LogMel()(torch.zeros(100))
