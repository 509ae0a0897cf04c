"""LayerSkip: train a model to exit early, then decode with its own early layers as the draft.

Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding"
(arXiv 2404.16710). Three pieces, each one formula (layers l = 0..L-1 are effective layers):

- layer dropout: sample i skips layer l with p_l = p_max * D(l), D(l) = 2^(l/(L-1)) - 1
  (exponential in depth: the first layer never, the last with p_max), so later layers
  learn to be optional;
- early-exit loss through the one shared exit (final norm + LM head):
  J = sum_l w_l CE_l / sum_l w_l over the layers the curriculum enables, with
  e(l) = s * sum_{i<=l} i for l < L-1 and e(L-1) = L-1 + s * sum_{i<=L-2} i;
  curricula: rotational (every R-th layer, rotating by step) and gradual (from the last
  layer down, one more every T/(2L) steps);
- self-speculative decoding: draft k tokens with the first E layers, then run layers E..L-1
  once over the k+1 drafted positions, reusing the draft's hidden states and KV cache; keep
  the longest prefix the full model agrees with plus the full model's next token. Greedy
  output is the plain greedy output, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedge.tasks.mobilellm.model import Transformer

DROPOUT_SCALES = ("exp", "linear", "uniform")
CURRICULA = ("none", "rotational", "gradual")


def layer_dropout_rates(depth: int, p_max: float, scale: str = "exp") -> Tensor:
    """p_l for l = 0..depth-1: p_max * D(l), D exponential (default), linear or uniform."""
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"layer dropout p_max must be in [0, 1), got {p_max}")
    depth_frac = torch.arange(depth, dtype=torch.float32) / max(depth - 1, 1)
    if scale == "exp":
        d = 2.0**depth_frac - 1.0
    elif scale == "linear":
        d = depth_frac
    elif scale == "uniform":
        d = torch.ones(depth)
    else:
        raise ValueError(f"unknown layer dropout scale {scale!r}; choose one of {DROPOUT_SCALES}")
    return p_max * d


def sample_layer_skip(
    batch: int, rates: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """(batch, depth) bool: which sample skips which layer this step."""
    return torch.rand(batch, len(rates), generator=generator) < rates


def early_exit_scales(depth: int, e_scale: float) -> Tensor:
    """e(l): the paper's unnormalised early-exit loss weights, growing with depth."""
    layer = torch.arange(depth, dtype=torch.float32)
    e = e_scale * layer * (layer + 1) / 2  # e_scale * sum_{i<=l} i
    e[-1] = (depth - 1) + e[-2] if depth > 1 else 1.0
    return e


def rotational_curriculum(step: int, depth: int, rotation: int) -> Tensor:
    """C_rot: early exit at layers l with l mod R == step mod R (and always the last)."""
    if rotation < 1:
        raise ValueError(f"rotation must be >= 1, got {rotation}")
    on = torch.arange(depth) % rotation == step % rotation
    on[-1] = True
    return on


def gradual_curriculum(step: int, depth: int, total_steps: int) -> Tensor:
    """C_grad: the last layer from the start, then one more layer downwards every
    total_steps / (2 * depth) steps, so every layer exits from total_steps / 2 on."""
    if total_steps < 1:
        raise ValueError(f"curriculum_steps must be >= 1, got {total_steps}")
    added = int(step * 2 * depth / total_steps)
    return torch.arange(depth) >= depth - 1 - added


@dataclass
class LayerSkipConfig:
    """LayerSkip training options; all off by default (plain next-token loss).

    dropout_max: p_max of layer dropout. dropout_scale: D(l)'s shape. early_exit_scale: s in
    e(l); 0 trains only the last exit. curriculum: which exits are on at a step ("none": all).
    rotation: R of the rotational curriculum. curriculum_steps: T of the gradual one.
    """

    dropout_max: float = 0.0
    dropout_scale: str = "exp"
    early_exit_scale: float = 0.0
    curriculum: str = "none"
    rotation: int = 4
    curriculum_steps: int = 1000

    def __post_init__(self) -> None:
        layer_dropout_rates(2, self.dropout_max, self.dropout_scale)  # validates both
        if self.early_exit_scale < 0:
            raise ValueError(f"early_exit_scale must be >= 0, got {self.early_exit_scale}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.curriculum!r}; choose one of {CURRICULA}")

    @property
    def active(self) -> bool:
        return self.dropout_max > 0 or self.early_exit_scale > 0

    def exits(self, step: int, depth: int) -> Tensor:
        """(depth,) bool: layers whose early-exit loss counts at this step."""
        if self.early_exit_scale == 0:
            on = torch.zeros(depth, dtype=torch.bool)
            on[-1] = True
            return on
        if self.curriculum == "rotational":
            return rotational_curriculum(step, depth, self.rotation)
        if self.curriculum == "gradual":
            return gradual_curriculum(step, depth, self.curriculum_steps)
        return torch.ones(depth, dtype=torch.bool)


def early_exit_loss(
    model: Transformer, hidden: dict[int, Tensor], targets: Tensor, weights: Tensor
) -> Tensor:
    """sum_l w_l CE(exit(h_l), y) / sum_l w_l over the layers in `hidden`."""
    total = sum(weights[layer] for layer in hidden)
    loss = torch.zeros((), device=targets.device)
    for layer, h in hidden.items():
        ce = F.cross_entropy(model.logits(h).flatten(0, 1), targets.flatten())
        loss = loss + weights[layer] / total * ce
    return loss


def layerskip_loss(
    model: Transformer, idx: Tensor, targets: Tensor, cfg: LayerSkipConfig, step: int
) -> Tensor:
    """The training loss of one batch under layer dropout and the early-exit curriculum."""
    depth = model.depth
    skip = None
    if cfg.dropout_max > 0:
        rates = layer_dropout_rates(depth, cfg.dropout_max, cfg.dropout_scale)
        skip = sample_layer_skip(idx.shape[0], rates).to(idx.device)
    weights = early_exit_scales(depth, cfg.early_exit_scale)
    exits = (cfg.exits(step, depth) & (weights > 0)).nonzero().flatten().tolist()
    _, hidden = model.run_layers(model.embed(idx), 0, depth, skip=skip, keep=exits)
    return early_exit_loss(model, hidden, targets, weights)


@dataclass
class SpeculativeStats:
    """What one self-speculative decode did: drafted and accepted tokens, verify passes."""

    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


@torch.inference_mode()
def self_speculative_generate(
    model: Transformer, prompt: Tensor, max_new_tokens: int, exit_layer: int, num_draft: int = 4
) -> tuple[Tensor, SpeculativeStats]:
    """Greedy decoding, drafted by layers [0, exit_layer) and verified by the rest.

    Invariant: the cache holds every committed token but the last, at every layer. A step
    feeds that last token and k drafts (k = num_draft, fewer near the end: never more than
    the tokens still wanted, so the cache is plain decoding's and whatever fits block_size
    for `generate` fits here) through the early layers (keeping their hidden states
    at exit_layer), runs the late layers once over those k+1 positions, and commits the
    agreeing drafts plus the full model's next token. Stale cache entries past the commit
    point are masked by position and overwritten by the next step.
    """
    depth = model.depth
    if not 0 < exit_layer < depth:
        raise ValueError(f"exit_layer must be in [1, {depth - 1}], got {exit_layer}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    dev = prompt.device
    p = prompt.shape[1]
    # The same cache as plain decoding: a step drafts at most the tokens still wanted but
    # one, so no position reaches p + max_new_tokens.
    model.setup_caches(1, p + max_new_tokens)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=dev), stats
    out = [int(model(prompt, torch.arange(p, device=dev))[0, -1].argmax())]
    n = p + 1  # committed tokens (prompt + out)
    while len(out) < max_new_tokens:
        k = min(num_draft, max_new_tokens - len(out) - 1)
        tok, drafts, hidden = out[-1], [], []
        for i in range(k + 1):
            pos = torch.tensor([n - 1 + i], device=dev)
            h, _ = model.run_layers(
                model.embed(torch.tensor([[tok]], device=dev)), 0, exit_layer, pos
            )
            hidden.append(h)
            if i < k:
                tok = int(model.logits(h)[0, -1].argmax())
                drafts.append(tok)
        pos = torch.arange(n - 1, n + k, device=dev)
        h, _ = model.run_layers(torch.cat(hidden, dim=1), exit_layer, depth, pos)
        verified = model.logits(h)[0].argmax(-1).tolist()
        accepted = 0
        while accepted < k and drafts[accepted] == verified[accepted]:
            accepted += 1
        out.extend(drafts[:accepted] + [verified[accepted]])
        n += accepted + 1
        stats.drafted += k
        stats.accepted += accepted
        stats.verify_passes += 1
    return torch.tensor(out, device=dev), stats
