"""Two speech tasks on one audio pipeline: phrase recognition with CTC (`asr`) and ten-keyword
spotting (`kws`). Both train the streaming transformer of `model.py` on log-mel features of
synthetic espeak-ng speakers (or real folders from `data_dir`); the speaker of each sample is
its natural group, so one speaker per client is natural non-IID data.

Options (from `[task_options]` or `--task-option`): speakers (training speakers),
test_speakers (held-out speakers), copies (augmented samples per speaker and text),
d_model, n_layer, n_head, fold (folding attention), fold_ffn (fold the FFN too), chunk,
left_chunks, energy_reports
(add the energy model's estimate to evaluation metrics).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fedge.tasks.asr.data import (
    ALPHABET,
    KEYWORDS,
    PHRASES,
    SAMPLE_RATE,
    SpeechCorpus,
    fit_length,
    load_speech_commands,
    load_transcripts,
    make_speakers,
    synthetic_corpus,
)
from fedge.tasks.asr.energy import energy_metrics
from fedge.tasks.asr.features import LogMel, num_frames
from fedge.tasks.asr.model import (
    ASRConfig,
    StreamingASR,
    ctc_greedy,
    edit_distance,
    subsampled_length,
)
from fedge.tasks.base import Batch, Task, classification_sums


def features_of(waves: list[np.ndarray], batch: int = 128) -> list[torch.Tensor]:
    """Log-mel features of each waveform, computed in zero-padded batches of similar length
    (many tiny STFT calls are far slower than a few big ones) and cut back to each length."""
    logmel = LogMel()
    out = [torch.empty(0)] * len(waves)  # every entry is replaced below
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            longest = max(len(waves[i]) for i in idx)
            padded = np.zeros((len(idx), max(longest, logmel.cfg.n_fft)), np.float32)
            for row, i in enumerate(idx):
                padded[row, : len(waves[i])] = waves[i]
            feats = logmel(torch.from_numpy(padded))
            for row, i in enumerate(idx):
                out[i] = feats[row, : max(num_frames(len(waves[i]), logmel.cfg), 1)].clone()
    return out


class SpeechDataset(Dataset):
    """Features and targets held in memory (a target is a class id or a character sequence)."""

    def __init__(self, feats: list[torch.Tensor], targets: list[Any]) -> None:
        self.feats, self.targets = feats, targets

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return self.feats[i], self.targets[i]


def pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to the longest (B, T, n_mels) and return the true lengths."""
    lengths = torch.tensor([f.shape[0] for f in feats])
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


class SpeechTask(Task):
    """What `asr` and `kws` share: options, corpus, features, model and groups."""

    head: ClassVar[str]

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        speakers: int = 40,
        test_speakers: int = 10,
        copies: int = 3,
        d_model: int = 96,
        n_layer: int = 3,
        n_head: int = 4,
        fold: int = 1,
        fold_ffn: bool = False,
        chunk: int = 4,
        left_chunks: int = 4,
        energy_reports: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(data_dir, seed, **options)
        if speakers < 1 or test_speakers < 1 or copies < 1:
            raise ValueError("speakers, test_speakers and copies must each be at least 1")
        self.energy_reports = energy_reports
        if data_dir:
            train, test = self.load_folder(data_dir)
        else:
            voices = make_speakers(speakers + test_speakers, seed)
            train = synthetic_corpus(self.classes(), voices[:speakers], copies, seed)
            test = synthetic_corpus(
                self.classes(), voices[speakers:], max(copies - 1, 1), seed, speakers
            )
        if len(train) == 0 or len(test) == 0:
            raise ValueError(f"{data_dir}: need both training and test speakers; add more")
        self.train_corpus, self.test_corpus = train, test
        self.model_cfg = ASRConfig(
            n_out=self.num_outputs(train),
            head=self.head,
            d_model=d_model,
            n_layer=n_layer,
            n_head=n_head,
            fold=fold,
            fold_ffn=bool(fold_ffn),
            chunk=chunk,
            left_chunks=left_chunks,
        )
        self._train_feats = features_of(self.prepare(train.waves))
        self._test_feats = features_of(self.prepare(test.waves))

    # Subclasses say what they recognise.
    @abstractmethod
    def classes(self) -> tuple[str, ...]:
        """The texts synthetic speakers say, one class each."""

    @abstractmethod
    def load_folder(self, data_dir: str) -> tuple[SpeechCorpus, SpeechCorpus]:
        """Train and test corpora from a real dataset folder."""

    @abstractmethod
    def num_outputs(self, corpus: SpeechCorpus) -> int:
        """Width of the model's output layer."""

    def prepare(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Audio edits before features (keyword spotting cuts 1 s clips)."""
        return waves

    @abstractmethod
    def targets(self, corpus: SpeechCorpus, indices: np.ndarray) -> list[Any]:
        """What the model learns to output for each sample at `indices`."""

    # The Task interface.
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return StreamingASR(self.model_cfg)

    def train_labels(self) -> np.ndarray:
        return self.train_corpus.labels

    def train_groups(self) -> np.ndarray:
        """The speaker of each training sample."""
        return self.train_corpus.groups

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        idx = np.arange(len(self.train_corpus)) if indices is None else np.asarray(indices)
        feats = [self._train_feats[i] for i in idx]
        return SpeechDataset(feats, self.targets(self.train_corpus, idx))

    def test_dataset(self) -> Dataset:
        idx = np.arange(len(self.test_corpus))
        return SpeechDataset(self._test_feats, self.targets(self.test_corpus, idx))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int = 256) -> dict[str, float]:
        """The task metric plus, with `energy_reports`, the energy model's estimate for the
        model as a device would run it (see `energy.py`)."""
        out = super().evaluate(model, data, batch_size)
        if self.energy_reports:
            out.update(energy_metrics(model))
        return out


class ASRTask(SpeechTask):
    """Phrase recognition with CTC over characters; the metric is the character error rate."""

    name = "asr"
    metric = "cer"
    higher_is_better = False
    head = "ctc"

    def classes(self) -> tuple[str, ...]:
        return PHRASES

    def load_folder(self, data_dir: str) -> tuple[SpeechCorpus, SpeechCorpus]:
        return load_transcripts(data_dir)

    def num_outputs(self, corpus: SpeechCorpus) -> int:
        return len(ALPHABET)

    def targets(self, corpus: SpeechCorpus, indices: np.ndarray) -> list[torch.Tensor]:
        return [encode_text(corpus.texts[i]) for i in indices]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        feats, lengths = pad_features([f for f, _ in items])
        targets = [t for _, t in items]
        return feats, lengths, torch.cat(targets), torch.tensor([len(t) for t in targets])

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Padded features and their valid lengths."""
        return batch[0], batch[1]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        feats, lengths, targets, target_lengths = batch
        log_probs = model(feats, lengths).log_softmax(-1)
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            subsampled_length(lengths),
            target_lengths,
            zero_infinity=True,
        )

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        feats, lengths, targets, target_lengths = batch
        logits = model(feats, lengths)
        enc_lengths = subsampled_length(lengths)
        loss = F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1),
            targets,
            enc_lengths,
            target_lengths,
            reduction="sum",
            zero_infinity=True,
        )
        refs = [decode_text(t) for t in targets.split(target_lengths.tolist())]
        hyps = [decode_text(h) for h in ctc_greedy(logits, enc_lengths)]
        return {
            "loss": float(loss),
            "num_examples": len(refs),
            "char_edits": sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)),
            "chars": sum(len(r) for r in refs),
            "word_edits": sum(
                edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True)
            ),
            "words": sum(len(r.split()) for r in refs),
            "exact": sum(r == h for r, h in zip(refs, hyps, strict=True)),
        }

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean CTC loss, CER and WER over all characters/words, and whole-phrase accuracy."""
        n = max(sums.get("num_examples", 0.0), 1.0)
        return {
            "loss": sums.get("loss", 0.0) / n,
            "cer": sums.get("char_edits", 0.0) / max(sums.get("chars", 0.0), 1.0),
            "wer": sums.get("word_edits", 0.0) / max(sums.get("words", 0.0), 1.0),
            "accuracy": sums.get("exact", 0.0) / n,
            "num_examples": sums.get("num_examples", 0.0),
        }


class KeywordTask(SpeechTask):
    """Ten-keyword spotting (yes, no, up, down, left, right, on, off, stop, go) on 1 s clips;
    the metric is accuracy."""

    name = "kws"
    head = "pool"

    def classes(self) -> tuple[str, ...]:
        return KEYWORDS

    def load_folder(self, data_dir: str) -> tuple[SpeechCorpus, SpeechCorpus]:
        return load_speech_commands(data_dir)

    def num_outputs(self, corpus: SpeechCorpus) -> int:
        return len(corpus.classes)

    def prepare(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        return [fit_length(w, SAMPLE_RATE) for w in waves]

    def targets(self, corpus: SpeechCorpus, indices: np.ndarray) -> list[int]:
        return [int(corpus.labels[i]) for i in indices]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        feats, labels = batch
        return F.cross_entropy(model(feats), labels)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        feats, labels = batch
        return classification_sums(model(feats), labels)


def encode_text(text: str) -> torch.Tensor:
    """Character ids in the CTC alphabet (blank is 0 and never appears in a target)."""
    bad = sorted(set(text) - set(ALPHABET[1:]))
    if bad:
        raise ValueError(f"text {text!r} has characters {bad} outside the alphabet; normalize it")
    return torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.long)


def decode_text(ids: torch.Tensor | list[int]) -> str:
    return "".join(ALPHABET[int(i)] for i in ids)
