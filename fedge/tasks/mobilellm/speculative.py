"""Self-speculative decoding: a model's first E layers draft, its remaining layers verify.

Elhoushi et al., "LayerSkip" (arXiv 2404.16710), Section 5: draft k tokens with layers
[0, E) and the shared exit, then run layers [E, L) once over the k+1 drafted positions,
reusing the draft's hidden states and KV cache. Each draft x ~ q (the exit's distribution) is
kept by the standard speculative-sampling test (Leviathan et al. 2023, Chen et al. 2023):
with probability min(1, p(x)/q(x)), p the full model's; the first rejected one is replaced by
a draw from normalise(max(0, p - q)), and when all k are kept one more token comes from p.
The output is then distributed exactly as sampling from the full model. At temperature 0
p and q are one-hot and the same test keeps a draft exactly when it is the full model's
argmax, so greedy self-speculative output is plain greedy output, token for token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedge.tasks.mobilellm.model import Transformer, sample_token, token_probs


@dataclass
class SpeculativeStats:
    """What one self-speculative decode did: drafted and accepted tokens, verify passes."""

    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def accepted_drafts(
    q_x: Tensor, p_x: Tensor, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """(B,) how many of each row's k drafts are kept: the longest prefix with u q(x) < p(x),
    u ~ U[0, 1) (min(1, p/q) without dividing). q_x, p_x: (B, k), the draft and full
    probabilities of the drafted tokens. At temperature 0 the test is certain (one-hot
    p and q), so no uniform is drawn."""
    if temperature > 0:
        u = torch.rand(q_x.shape, generator=generator, device=q_x.device)
    else:
        u = torch.zeros_like(q_x)
    return (u * q_x < p_x).long().cumprod(-1).sum(-1)


def _check_exit(model: Transformer, exit_layer: int, num_draft: int) -> None:
    if not 0 < exit_layer < model.depth:
        raise ValueError(f"exit_layer must be in [1, {model.depth - 1}], got {exit_layer}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")


@torch.inference_mode()
def self_speculative_generate(
    model: Transformer,
    prompt: Tensor,
    max_new_tokens: int,
    exit_layer: int,
    num_draft: int = 4,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Decoding drafted by layers [0, exit_layer) and verified by the rest; greedy at
    temperature 0 (equal to `generate`), else distributed as `generate` sampling.

    Invariant: the cache holds every committed token but the last, at every layer. A step
    feeds that last token and k drafts (k = num_draft, fewer near the end: never more than
    the tokens still wanted, so the cache is plain decoding's and whatever fits block_size
    for `generate` fits here) through the early layers (keeping their hidden states
    at exit_layer), runs the late layers once over those k+1 positions, and commits the
    kept drafts plus one token from the full model. Stale cache entries past the commit
    point are masked by position and overwritten by the next step.
    """
    _check_exit(model, exit_layer, num_draft)
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    dev, depth = prompt.device, model.depth
    p = prompt.shape[1]
    # The same cache as plain decoding: a step drafts at most the tokens still wanted but
    # one, so no position reaches p + max_new_tokens.
    model.setup_caches(1, p + max_new_tokens)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=dev), stats
    first = model(prompt, torch.arange(p, device=dev))[0, -1]
    out = [sample_token(token_probs(first, temperature), generator)]
    n = p + 1  # committed tokens (prompt + out)
    while len(out) < max_new_tokens:
        k = min(num_draft, max_new_tokens - len(out) - 1)
        tok, drafts, q, hidden = out[-1], [], [], []
        for i in range(k + 1):
            pos = torch.tensor([n - 1 + i], device=dev)
            h, _ = model.run_layers(
                model.embed(torch.tensor([[tok]], device=dev)), 0, exit_layer, pos
            )
            hidden.append(h)
            if i < k:
                q.append(token_probs(model.logits(h)[0, -1], temperature))
                tok = sample_token(q[-1], generator)
                drafts.append(tok)
        pos = torch.arange(n - 1, n + k, device=dev)
        h, _ = model.run_layers(torch.cat(hidden, dim=1), exit_layer, depth, pos)
        p_full = token_probs(model.logits(h)[0], temperature)  # (k + 1, V)
        drafted = torch.tensor(drafts, dtype=torch.long, device=dev)
        q_x = torch.tensor([float(qi[x]) for qi, x in zip(q, drafts, strict=True)], device=dev)
        p_x = p_full[:k].gather(1, drafted[:, None]).squeeze(1)
        kept = int(accepted_drafts(q_x[None], p_x[None], temperature, generator)[0])
        if kept < k:
            nxt = sample_token((p_full[kept] - q[kept]).clamp(min=0), generator)
        else:
            nxt = sample_token(p_full[k], generator)
        out.extend(drafts[:kept] + [nxt])
        n += kept + 1
        stats.drafted += k
        stats.accepted += kept
        stats.verify_passes += 1
    return torch.tensor(out, device=dev), stats


@torch.inference_mode()
def heldout_acceptance(
    model: Transformer,
    windows: Tensor,
    exit_layer: int,
    num_draft: int,
    prefix_lens: Iterable[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """The fraction of drafts the full model keeps, drafting on held-out text's true prefix.

    For each window (B, W) of held-out text and prefix length P, exit `exit_layer` drafts
    num_draft tokens after the true first P tokens, and the full model verifies them with the
    decoding rule (`accepted_drafts`). Unlike acceptance while decoding, this does not
    reward a model for steering its own text into loops any exit predicts.
    """
    _check_exit(model, exit_layer, num_draft)
    kept, drafted = 0, 0
    for plen in prefix_lens:
        if not 0 < plen <= windows.shape[1]:
            raise ValueError(f"prefix length {plen} outside 1..{windows.shape[1]}")
        x, q_x = windows[:, :plen], []
        for _ in range(num_draft):
            h, _ = model.run_layers(model.embed(x), 0, exit_layer)
            q = token_probs(model.logits(h[:, -1]), temperature)  # (B, V)
            d = torch.multinomial(q, 1, generator=generator)  # one-hot q: its argmax
            q_x.append(q.gather(1, d))
            x = torch.cat([x, d], dim=1)
        h, _ = model.run_layers(model.embed(x), 0, model.depth)
        p = token_probs(model.logits(h[:, plen - 1 : plen - 1 + num_draft]), temperature)
        p_x = p.gather(2, x[:, plen:, None]).squeeze(-1)
        kept += int(accepted_drafts(torch.cat(q_x, dim=1), p_x, temperature, generator).sum())
        drafted += num_draft * len(windows)
    return kept / max(drafted, 1)
