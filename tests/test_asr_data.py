"""Synthetic speakers from espeak-ng and loaders for real folders, on fixtures written here."""

import numpy as np
import pytest
from asr_fixtures import write_wav

from fedge.tasks.asr import data
from fedge.tasks.asr.data import (
    KEYWORDS,
    Speaker,
    augment,
    fit_length,
    load_speech_commands,
    load_transcripts,
    make_speakers,
    read_wav,
    speaker_utterances,
    synthesize,
    synthetic_corpus,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGE_CACHE_DIR", str(tmp_path / "cache"))


def test_speakers_are_deterministic_and_distinct():
    a, b = make_speakers(30, seed=1), make_speakers(30, seed=1)
    assert a == b and len(set(a)) == 30
    assert make_speakers(30, seed=2) != a


def test_synthesis_is_deterministic_speaker_dependent_and_speechlike():
    s1, s2 = make_speakers(2, seed=0)
    left, stop = synthesize(("left", "stop"), s1)
    assert left.dtype == np.float32 and np.abs(left).max() == pytest.approx(0.9, abs=1e-6)
    assert 0.1 < len(left) / data.SAMPLE_RATE < 1.5
    for a, b in zip((left, stop), synthesize(("left", "stop"), s1), strict=True):
        np.testing.assert_array_equal(a, b)
    other = synthesize(("left",), s2)[0]
    assert not np.array_equal(fit_length(left, 16000), fit_length(other, 16000))
    # Different words by one speaker differ too (not a constant tone).
    assert not np.array_equal(fit_length(left, 16000), fit_length(stop, 16000))


def test_slower_speaker_takes_longer():
    fast = Speaker("en-us", "m3", rate=220, pitch=50, pitch_range=50)
    slow = Speaker("en-us", "m3", rate=120, pitch=50, pitch_range=50)
    text = ("turn on the light",)
    assert len(synthesize(text, slow)[0]) > 1.3 * len(synthesize(text, fast)[0])


def test_unknown_voice_is_a_clear_error():
    with pytest.raises(ValueError, match="no voice"):
        synthesize(("yes",), Speaker("xx-nope", "m1", 150, 50, 50))


def test_disk_cache_returns_the_same_audio(tmp_path):
    speaker = make_speakers(1, seed=3)[0]
    first = speaker_utterances(speaker, KEYWORDS[:3])
    files = list((tmp_path / "cache" / "speech").glob("*.npz"))
    assert len(files) == 1
    again = speaker_utterances(speaker, KEYWORDS[:3])
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_corpus_groups_labels_and_augmentation():
    speakers = make_speakers(3, seed=0)
    c = synthetic_corpus(KEYWORDS, speakers, copies=3, seed=0)
    assert len(c) == 3 * 10 * 3
    assert np.bincount(c.groups).tolist() == [30, 30, 30]
    assert np.bincount(c.labels).tolist() == [9] * 10
    clean, noisy = c.waves[0], c.waves[1]
    assert c.texts[0] == c.texts[1] == "yes"
    assert len(noisy) >= len(clean) and not np.array_equal(noisy[: len(clean)], clean)
    again = synthetic_corpus(KEYWORDS, speakers, copies=3, seed=0)
    np.testing.assert_array_equal(again.waves[1], noisy)


def test_augment_keeps_speech_above_noise():
    rng = np.random.default_rng(0)
    x = np.sin(np.linspace(0, 400, 8000)).astype(np.float32)
    y = augment(x, rng)
    assert len(x) <= len(y) <= len(x) + 1600
    assert 0.2 < np.abs(y).max() < 1.2


def test_fit_length_pads_and_crops_centred():
    assert fit_length(np.ones(4), 8).tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert fit_length(np.arange(10.0), 4).tolist() == [3, 4, 5, 6]


def test_read_wav_resamples_and_mixes_channels(tmp_path):
    t = np.arange(8000) / 8000
    x = 0.5 * np.sin(2 * np.pi * 200 * t)
    write_wav(tmp_path / "a.wav", np.repeat(x, 2), rate=8000, channels=2)
    y = read_wav(tmp_path / "a.wav")
    assert len(y) == 16000
    assert np.abs(y).max() == pytest.approx(0.5, abs=0.02)
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="PCM WAV"):
        read_wav(tmp_path / "bad.wav")


def test_speech_commands_folder_with_testing_list(tmp_path):
    rng = np.random.default_rng(0)
    for word in ("yes", "no", "cat"):
        for spk in ("aaa", "bbb", "ccc"):
            write_wav(tmp_path / word / f"{spk}_nohash_0.wav", rng.normal(0, 0.1, 16000))
    (tmp_path / "testing_list.txt").write_text("yes/ccc_nohash_0.wav\nno/ccc_nohash_0.wav\n")
    train, test = load_speech_commands(tmp_path)
    assert len(train) == 4 and len(test) == 2  # "cat" is not a keyword
    assert sorted(train.texts) == ["no", "no", "yes", "yes"]
    assert set(train.labels.tolist()) == {0, 1} and train.classes == KEYWORDS
    assert len(set(train.groups.tolist())) == 2 and len(set(test.groups.tolist())) == 1
    assert len(train.waves[0]) == 16000


def test_speech_commands_hash_split_keeps_speakers_apart(tmp_path):
    for spk in range(40):
        write_wav(tmp_path / "go" / f"s{spk}_nohash_0.wav", np.zeros(1600))
        write_wav(tmp_path / "go" / f"s{spk}_nohash_1.wav", np.zeros(1600))
    train, test = load_speech_commands(tmp_path, test_percent=20)
    assert len(train) + len(test) == 80 and len(test) > 0 and len(train) > 0
    assert len(train) % 2 == 0 and len(test) % 2 == 0  # both files of a speaker stay together


def test_speech_commands_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Speech"):
        load_speech_commands(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_speech_commands(tmp_path / "nope")


def test_transcripts_with_wav(tmp_path):
    rng = np.random.default_rng(0)
    for spk in ("19", "26", "27", "32", "39", "40", "60", "78", "83", "87"):
        folder = tmp_path / spk / "1"
        lines = []
        for i, text in enumerate(["HELLO, World!", "GOOD   morning"]):
            utt = f"{spk}-1-{i:04d}"
            write_wav(folder / f"{utt}.wav", rng.normal(0, 0.1, 8000))
            lines.append(f"{utt} {text}")
        (folder / f"{spk}-1.trans.txt").write_text("\n".join(lines) + "\n")
    train, test = load_transcripts(tmp_path, test_percent=30)
    assert len(train) + len(test) == 20 and len(test) > 0
    assert set(train.texts) | set(test.texts) == {"hello world", "good morning"}
    assert train.classes == ("good morning", "hello world")


def test_transcripts_with_flac_only_say_how_to_convert(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    (tmp_path / "1" / "1-2-0000.flac").write_bytes(b"fLaC")
    with pytest.raises(ValueError, match="ffmpeg"):
        load_transcripts(tmp_path)
