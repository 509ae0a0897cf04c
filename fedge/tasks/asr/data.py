"""Speech for the ASR and keyword-spotting tasks: synthetic speakers from espeak-ng, or real
folders from `--data-dir`.

Synthetic speech comes from libespeak-ng as bundled by the `espeakng-loader` wheel, driven with
ctypes in synchronous mode (samples arrive through a callback), one private library instance
per speaker so that synthesis is deterministic. A speaker is an accent voice, a
voice variant, a speaking rate, a pitch and a pitch range: one speaker per client is natural
non-IID data. Clean utterances are cached on disk per speaker (`FEDGE_CACHE_DIR`, else
`$XDG_CACHE_HOME/fedge`, else `~/.cache/fedge`); noise, gain and a small time shift then make
many samples per speaker.

Real data: Speech Commands folders (`word/*.wav`) and LibriSpeech-style transcripts
(`*.trans.txt` with one `UTTERANCE-ID TEXT` per line). Audio is read with the standard
library's `wave` module, so it must be PCM WAV: LibriSpeech ships FLAC, which needs an extra
decoder; convert it first (`ffmpeg -i X.flac -ar 16000 X.wav`).
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
import wave
import zlib
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from fedge.files import cache_dir

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
PHRASES = (
    "turn on the light",
    "turn off the light",
    "go left",
    "go right",
    "move up",
    "move down",
    "stop the music",
    "play the next song",
    "open the door",
    "close the window",
    "call my mother",
    "set a timer",
)
ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
VARIANTS = (
    *(f"m{i}" for i in range(1, 9)),
    *(f"f{i}" for i in range(1, 6)),
    *(f"klatt{i}" for i in ("", "2", "3", "4", "5", "6")),
    "adam", "Andy", "annie", "aunty", "benjamin", "boris", "caleb", "david", "ed",
    "edward", "grandma", "grandpa", "ian", "john", "linda", "max", "michel", "norbert",
    "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
)  # fmt: skip
# CTC alphabet: index 0 is the blank.
ALPHABET = "_ 'abcdefghijklmnopqrstuvwxyz"
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Speaker:
    """A synthetic voice: espeak-ng voice and variant, rate (words/min), pitch, range (0-99)."""

    voice: str
    variant: str
    rate: int
    pitch: int
    pitch_range: int

    @property
    def voice_name(self) -> str:
        return f"{self.voice}+{self.variant}"


def make_speakers(n: int, seed: int = 0) -> list[Speaker]:
    """`n` distinct speakers, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out: list[Speaker] = []
    seen: set[Speaker] = set()
    while len(out) < n:
        s = Speaker(
            voice=str(rng.choice(ACCENTS)),
            variant=str(rng.choice(VARIANTS)),
            rate=int(rng.integers(120, 221)),
            pitch=int(rng.integers(20, 81)),
            pitch_range=int(rng.integers(20, 81)),
        )
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# --- espeak-ng through ctypes ----------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakVoice:
    """A private libespeak-ng instance for one speaker (use as a context manager).

    espeak-ng keeps synthesis state (noise generators, filters) between utterances, and
    reseeding does not reset all of it, so the same text comes out slightly different each
    time within one process. A fresh library instance replaying the same call sequence is
    byte-identical, so each speaker gets its own copy of the shared library, loaded from a
    temporary file (dlopen shares state per path), used for that speaker's texts, then closed.
    """

    def __init__(self, speaker: Speaker) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError(
                "synthetic speech needs the espeakng-loader wheel: pip install espeakng-loader"
            ) from exc
        self._tmp = tempfile.TemporaryDirectory(prefix="fedge-espeak-")
        path = Path(self._tmp.name) / "libespeak-ng.so"
        shutil.copy(espeakng_loader.get_library_path(), path)
        lib = ctypes.CDLL(str(path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with {self.sample_rate}")
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):  # noqa: ANN001 - ctypes callback signature
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
            return 0

        self._callback = _SynthCallback(collect)  # must outlive the library's use of it
        lib.espeak_SetSynthCallback(self._callback)
        if lib.espeak_SetVoiceByName(speaker.voice_name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {speaker.voice_name!r}")
        lib.espeak_SetParameter(_RATE, speaker.rate, 0)
        lib.espeak_SetParameter(_PITCH, speaker.pitch, 0)
        lib.espeak_SetParameter(_RANGE, speaker.pitch_range, 0)
        self.lib = lib

    def synth(self, text: str) -> np.ndarray:
        """int16 samples at `self.sample_rate`."""
        self._chunks = []
        data = text.encode()
        err = self.lib.espeak_Synth(
            data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        self.lib.espeak_Synchronize()
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with {err} for {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def close(self) -> None:
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)
        self._tmp.cleanup()

    def __enter__(self) -> EspeakVoice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trim_silence(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Drop leading and trailing samples quieter than `threshold` of the peak."""
    loud = np.flatnonzero(np.abs(x) > threshold * max(float(np.abs(x).max(initial=0.0)), 1e-9))
    return x[loud[0] : loud[-1] + 1] if loud.size else x


def synthesize(
    texts: tuple[str, ...], speaker: Speaker, sample_rate: int = SAMPLE_RATE
) -> list[np.ndarray]:
    """`speaker` says each text in turn: float32 in [-1, 1] at `sample_rate`, silence trimmed,
    peak 0.9. The same speaker and texts always give the same audio."""
    out = []
    with EspeakVoice(speaker) as voice:
        raw = [voice.synth(t) for t in texts]
        rate = voice.sample_rate
    g = np.gcd(sample_rate, rate)
    for x in raw:
        y = resample_poly(x.astype(np.float32) / 32768.0, sample_rate // g, rate // g)
        y = trim_silence(y.astype(np.float32))
        out.append(0.9 * y / max(float(np.abs(y).max(initial=0.0)), 1e-9))
    return out


def speaker_utterances(
    speaker: Speaker, texts: tuple[str, ...], sample_rate: int = SAMPLE_RATE
) -> list[np.ndarray]:
    """Clean utterances of `texts` by `speaker`, from the disk cache when already made."""
    key = json.dumps(
        [asdict(speaker), list(texts), sample_rate, version("espeakng-loader")], sort_keys=True
    )
    path = cache_dir("speech") / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"
    if path.exists():
        with np.load(path) as z:
            return np.split(z["audio"], z["offsets"][1:-1])
    waves = synthesize(texts, speaker, sample_rate)
    offsets = np.cumsum([0] + [len(w) for w in waves])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, audio=np.concatenate(waves), offsets=offsets)
    os.replace(tmp, path)
    return waves


def augment(x: np.ndarray, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Gain (0.3-1x), a time shift of up to 100 ms and white noise at 10-40 dB SNR."""
    shift = int(rng.integers(0, sample_rate // 10 + 1))
    y = np.concatenate([np.zeros(shift, np.float32), x * rng.uniform(0.3, 1.0)])
    snr_db = rng.uniform(10.0, 40.0)
    noise_rms = np.sqrt(np.mean(y**2) + 1e-12) / 10 ** (snr_db / 20)
    return (y + rng.normal(0.0, noise_rms, y.shape)).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad to exactly `n` samples (keyword spotting uses 1 s clips)."""
    if len(x) >= n:
        start = (len(x) - n) // 2
        return x[start : start + n]
    left = (n - len(x)) // 2
    return np.pad(x, (left, n - len(x) - left))


@dataclass
class SpeechCorpus:
    """Waveforms with their text, class label (index into `classes`) and speaker group."""

    waves: list[np.ndarray]
    texts: list[str]
    labels: np.ndarray
    groups: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.waves)


def synthetic_corpus(
    classes: tuple[str, ...],
    speakers: list[Speaker],
    copies: int,
    seed: int = 0,
    group_offset: int = 0,
) -> SpeechCorpus:
    """Every speaker says every class text `copies` times, each copy freshly augmented.

    The first copy of each is the clean utterance, so `copies=1` gives clean speech.
    Groups are speaker indices plus `group_offset`.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    waves, texts, labels, groups = [], [], [], []
    for s_idx, speaker in enumerate(speakers):
        rng = np.random.default_rng([seed, s_idx + group_offset])
        for label, clean in enumerate(speaker_utterances(speaker, classes)):
            for copy in range(copies):
                waves.append(clean if copy == 0 else augment(clean, rng))
                texts.append(classes[label])
                labels.append(label)
                groups.append(s_idx + group_offset)
    return SpeechCorpus(waves, texts, np.array(labels), np.array(groups), classes)


# --- real data from --data-dir ---------------------------------------------------------------
def read_wav(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 in [-1, 1] at `sample_rate` from 8/16/32-bit PCM WAV (channels averaged)."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except wave.Error as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc}); convert it to 16-bit WAV") from exc
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported; use 16-bit PCM")
    x = np.frombuffer(raw, dtypes[width]).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    x = x.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        g = np.gcd(rate, sample_rate)
        x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
    return x


def _held_out(speaker: str, test_percent: int) -> bool:
    """A stable speaker-level split (the same speaker never lands in both sets)."""
    return zlib.crc32(speaker.encode()) % 100 < test_percent


def _split(
    items: list[tuple[Path, str, str]], classes: tuple[str, ...], is_test: list[bool]
) -> tuple[SpeechCorpus, SpeechCorpus]:
    speakers = sorted({s for _, _, s in items})
    speaker_id = {s: i for i, s in enumerate(speakers)}
    class_id = {c: i for i, c in enumerate(classes)}
    parts: tuple[list, list] = ([], [])
    for item, test in zip(items, is_test, strict=True):
        parts[test].append(item)
    out = []
    for part in parts:
        out.append(
            SpeechCorpus(
                waves=[read_wav(p) for p, _, _ in part],
                texts=[t for _, t, _ in part],
                labels=np.array([class_id.get(t, -1) for _, t, _ in part], dtype=np.int64),
                groups=np.array([speaker_id[s] for _, _, s in part], dtype=np.int64),
                classes=classes,
            )
        )
    return out[0], out[1]


def load_speech_commands(
    data_dir: str | Path, words: tuple[str, ...] = KEYWORDS, test_percent: int = 10
) -> tuple[SpeechCorpus, SpeechCorpus]:
    """Train and test corpora from a Speech Commands-style folder: `data_dir/WORD/*.wav`.

    Only `words` are read. The speaker is the file name before `_nohash_` (the whole stem if
    absent). Files named in `testing_list.txt` form the test set when it exists; otherwise a
    stable hash of the speaker puts `test_percent`% of speakers there.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data dir {root} does not exist; point --data-dir at the folders")
    items = []
    for word in words:
        for path in sorted((root / word).glob("*.wav")):
            items.append((path, word, path.stem.split("_nohash_")[0]))
    if not items:
        raise ValueError(
            f"no WORD/*.wav files under {root} for any of {list(words)}; expected a Speech "
            "Commands layout such as yes/0a7c2a8d_nohash_0.wav"
        )
    listed = root / "testing_list.txt"
    if listed.exists():
        test_files = set(listed.read_text().split())
        is_test = [f"{p.parent.name}/{p.name}" in test_files for p, _, _ in items]
    else:
        is_test = [_held_out(s, test_percent) for _, _, s in items]
    return _split(items, words, is_test)


def normalize_text(text: str) -> str:
    """Lower case, letters, apostrophes and single spaces only (the CTC alphabet)."""
    text = re.sub(r"[^a-z' ]+", " ", text.lower())
    return " ".join(text.split())


def load_transcripts(
    data_dir: str | Path, test_percent: int = 10
) -> tuple[SpeechCorpus, SpeechCorpus]:
    """Train and test corpora from LibriSpeech-style `*.trans.txt` files with WAV audio.

    Each line is `SPEAKER-CHAPTER-UTT text`; the audio is `SPEAKER-CHAPTER-UTT.wav` in the same
    folder. Classes are the distinct transcripts (labels for partitioning); the speaker is the
    first dash-separated field; a stable hash of it holds out `test_percent`% of speakers.
    """
    root = Path(data_dir)
    listings = sorted(root.rglob("*.trans.txt")) if root.is_dir() else []
    if not listings:
        raise ValueError(f"no *.trans.txt files under {root}; expected a LibriSpeech layout")
    items = []
    for listing in listings:
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            audio = listing.parent / f"{utt}.wav"
            if not audio.exists():
                flac = audio.with_suffix(".flac")
                hint = (
                    f"{flac.name} exists but FLAC needs a decoder fedge does not ship; "
                    "convert it: ffmpeg -i X.flac -ar 16000 X.wav"
                    if flac.exists()
                    else "add the WAV file or remove the line"
                )
                raise ValueError(f"{listing}: no audio {audio.name} for {utt}; {hint}")
            items.append((audio, normalize_text(text), utt.split("-")[0]))
    classes = tuple(sorted({t for _, t, _ in items}))
    return _split(items, classes, [_held_out(s, test_percent) for _, _, s in items])
