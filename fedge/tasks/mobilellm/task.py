"""The federated on-device language-modelling task: fine-tune MobileLLM on local text.

Samples are fixed-length byte windows; a window's label is its topic group, so every
label partitioner (iid, k-class, dirichlet) works, and `train_groups` gives the natural
one-group-per-client split. The metric is perplexity (lower is better). With
`trainable="lora"` only the adapters train, so a client's update is a few tensors: ship
`fedge.tasks.mobilellm.lora.trainable_state(model)`, not the whole state_dict.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedge.tasks.base import Batch, Task, TrainConfig, TrainReport
from fedge.tasks.mobilellm.data import ByteTokenizer, build_corpus, pydoc_topics, read_text_dir
from fedge.tasks.mobilellm.layerskip import LayerSkipConfig, layerskip_loss
from fedge.tasks.mobilellm.lora import apply_lora
from fedge.tasks.mobilellm.model import Transformer, build_model

TRAINABLE = ("full", "lora")


class MobileLLMTask(Task):
    """Next-byte prediction with a MobileLLM decoder, optionally LoRA and LayerSkip.

    Options: config (a name in model.CONFIGS or a local HF checkpoint folder), init (a
    state_dict file of that config to start from, such as a run's final_model.pt: LoRA then
    adapts a trained model, not a random one), trainable ("full" | "lora"), lora_rank,
    lora_alpha, seq_len, num_groups (topic groups), layer_dropout (LayerSkip p_max),
    dropout_curriculum (its S(t): "constant" | "exp"), early_exit_scale, curriculum
    ("none" | "rotational" | "gradual"), rotation, curriculum_steps (T of both curricula,
    counted in this task's training steps: every client this process trains), clip_grad
    (max gradient norm; 0: off).
    """

    name = "mobilellm"
    metric = "perplexity"
    higher_is_better = False

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        config: str = "tiny",
        init: str = "",
        trainable: str = "full",
        lora_rank: int = 4,
        lora_alpha: float = 8.0,
        seq_len: int = 64,
        num_groups: int = 10,
        layer_dropout: float = 0.0,
        dropout_curriculum: str = "constant",
        early_exit_scale: float = 0.0,
        curriculum: str = "none",
        rotation: int = 4,
        curriculum_steps: int = 1000,
        clip_grad: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(data_dir, seed, **options)
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.config, self.trainable = config, trainable
        self.init = init
        self._init_state: dict[str, torch.Tensor] | None = None
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.seq_len, self.num_groups = int(seq_len), int(num_groups)
        self.layerskip = LayerSkipConfig(
            dropout_max=float(layer_dropout),
            dropout_curriculum=dropout_curriculum,
            early_exit_scale=float(early_exit_scale),
            curriculum=curriculum,
            rotation=int(rotation),
            curriculum_steps=int(curriculum_steps),
        )
        self.clip_grad = float(clip_grad)
        self.tokenizer = ByteTokenizer()
        self.step = 0  # LayerSkip curricula advance with this task's training steps
        self._corpus = None

    @property
    def corpus(self):
        if self._corpus is None:
            docs = read_text_dir(self.data_dir) if self.data_dir else pydoc_topics()
            self._corpus = build_corpus(docs, self.num_groups, self.seq_len)
        return self._corpus

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = build_model(self.config)
            cfg = model.config
            if cfg.vocab_size < self.tokenizer.vocab_size or cfg.block_size < self.seq_len:
                raise ValueError(
                    f"model config {self.config!r} (vocab {cfg.vocab_size}, block_size "
                    f"{cfg.block_size}) cannot take byte tokens (256) in windows of {self.seq_len}"
                )
            if self.init:
                self._load_init(model)
            if self.trainable == "lora":
                apply_lora(model, self.lora_rank, self.lora_alpha)
        return model

    def _load_init(self, model: nn.Module) -> None:
        """Start from the `init` state_dict (read once per task), which must fit the config."""
        if self._init_state is None:
            try:
                self._init_state = torch.load(self.init, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ValueError(f"init {self.init}: not a readable state_dict ({exc})") from None
        mine, given = model.state_dict(), self._init_state
        unfit = {
            "missing": sorted(mine.keys() - given.keys()),
            "unexpected": sorted(given.keys() - mine.keys()),
            "of another shape": [k for k in mine if k in given and mine[k].shape != given[k].shape],
        }
        if any(unfit.values()):
            said = ", ".join(f"{len(v)} {what} (e.g. {v[0]})" for what, v in unfit.items() if v)
            raise ValueError(
                f"init {self.init} does not fit model config {self.config!r}: {said} keys; "
                "give the config it was trained with"
            )
        model.load_state_dict(given)

    def train_labels(self) -> np.ndarray:
        return self.corpus.train_group

    def train_groups(self) -> np.ndarray:
        return self.corpus.train_group

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        w = self.corpus.train if indices is None else self.corpus.train[torch.as_tensor(indices)]
        return TensorDataset(w[:, :-1], w[:, 1:])

    def test_dataset(self) -> Dataset:
        w = self.corpus.test
        return TensorDataset(w[:, :-1], w[:, 1:])

    def train(self, model: nn.Module, data: Dataset, cfg: TrainConfig) -> TrainReport:
        """The shared loop, with gradient-norm clipping: plain SGD on a transformer
        diverges at learning rates that make progress without it."""
        if self.clip_grad > 0:
            cfg = replace(cfg, grad_hooks=[*cfg.grad_hooks, self._clip])
        return super().train(model, data, cfg)

    def _clip(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        if model.training and self.layerskip.active:
            self.step += 1
            return layerskip_loss(cast(Transformer, model), x, y, self.layerskip, self.step - 1)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
        return {"loss": float(loss), "num_examples": float(y.numel())}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss per token and its perplexity."""
        n = max(sums.get("num_examples", 0.0), 1.0)
        loss = sums["loss"] / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_examples": n}

    @torch.no_grad()
    def evaluate_exits(
        self, model: Transformer, data: Dataset, batch_size: int = 64
    ) -> dict[int, dict[str, float]]:
        """Per early exit E (layers 1..E through the shared head): perplexity, and agreement,
        the fraction of tokens where its greedy choice equals the last layer's, which is
        what self-speculative drafting from E needs, measured on real text."""
        model.eval()
        depth = model.depth
        loss = torch.zeros(depth, dtype=torch.float64)
        agree = torch.zeros(depth, dtype=torch.float64)
        tokens = 0
        for x, y in self.loader(data, batch_size, shuffle=False):
            _, hidden = model.run_layers(model.embed(x), 0, depth, keep=range(depth))
            logits = {layer: model.logits(h) for layer, h in hidden.items()}
            final = logits[depth - 1].argmax(-1)
            for layer, z in logits.items():
                loss[layer] += float(F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="sum"))
                agree[layer] += float((z.argmax(-1) == final).sum())
            tokens += y.numel()
        return {
            layer + 1: {
                "perplexity": math.exp(min(float(loss[layer]) / tokens, 50.0)),
                "agreement": float(agree[layer]) / tokens,
            }
            for layer in range(depth)
        }
