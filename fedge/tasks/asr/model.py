"""A streaming transformer for on-device speech: causal conv subsampling, a chunked encoder
with bounded left context, a CTC head (phrases) or a pooled classifier (keywords).

Streaming. Encoder frames are grouped into chunks of `chunk` frames; a frame attends to every
frame of its own chunk and of the `left_chunks` chunks before it, never to a later chunk
(a block-causal mask). Subsampling convolutions are causal. So `stream_step`, fed one chunk
of features at a time with a bounded cache, emits exactly what `forward` computes on the whole
utterance.

Folding attention (Li et al., arXiv 2309.07988). In streaming ASR few tokens are processed per
step, so linear projections, not the attention scores, dominate size, memory traffic and
power. Folding attention reshapes each D-wide token into `fold` sub-tokens of width D/fold
before the attention's Q/K/V projections (weights (D/N)^2 instead of D^2), attends over the
N-times longer sub-token sequence, projects the output per sub-token and unfolds back to
D-wide tokens; the feed-forward network stays unfolded, as in the paper. Heads keep their
width: a folded layer has n_head/N heads per sub-token. `fold_ffn=True` also folds the FFN
(fedge's extension, not the paper's: weights shrink much further, at an accuracy cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedge.tasks.layers import split_even


@dataclass
class ASRConfig:
    """Model shape. Encoder frames are 4 feature frames (40 ms); a chunk of 4 is 160 ms."""

    n_mels: int = 40
    n_out: int = 29  # CTC: the alphabet with blank at 0; keyword spotting: the classes
    d_model: int = 96
    n_layer: int = 3
    n_head: int = 4
    ffn_mult: int = 4
    fold: int = 1  # folding attention: the attention's linear layers act on D/fold sub-tokens
    fold_ffn: bool = False  # also fold the feed-forward network (not in the paper)
    chunk: int = 4
    left_chunks: int = 4
    head: str = "ctc"  # "ctc" (per-frame logits) or "pool" (one class per utterance)
    feat_mean: float = -8.0  # log-mel features are shifted and scaled by these constants
    feat_std: float = 6.0

    def __post_init__(self) -> None:
        if self.d_model % self.fold or self.n_head % self.fold:
            raise ValueError(
                f"fold={self.fold} must divide d_model={self.d_model} and n_head={self.n_head}"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError("d_model / n_head must be even for rotary position embeddings")
        if self.head not in ("ctc", "pool"):
            raise ValueError(f"head must be 'ctc' or 'pool', got {self.head!r}")
        if self.chunk < 1 or self.left_chunks < 0:
            raise ValueError("chunk must be >= 1 and left_chunks >= 0")


SUBSAMPLING = 4  # two stride-2 convolutions


# --- pieces ----------------------------------------------------------------------------------
class CausalConv(nn.Module):
    """Stride-2 conv over time that sees only past frames; streams with a (k-1)-frame cache."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride)
        self.context = kernel - 1

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """x: (B, C, T). Returns (y, new_cache); chunk lengths except the last must be even."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([cache, x], dim=2)
        return F.gelu(self.conv(x)), x[:, :, x.shape[2] - self.context :]


def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the last dim of (B, H, L, d) at absolute `positions` (L,).

    Scores then depend only on relative position, so a stream with an offset matches the
    full pass."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = positions.float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def fold_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, D) -> (B, T*n, D/n): each token becomes n consecutive sub-tokens."""
    b, t, d = x.shape
    return x.reshape(b, t * n, d // n)


def unfold_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T*n, D/n) -> (B, T, D), the inverse of `fold_tokens`."""
    b, tn, w = x.shape
    return x.reshape(b, tn // n, w * n)


class FoldingAttention(nn.Module):
    """Multi-head self-attention whose projections act on folded sub-tokens (fold=1: plain)."""

    def __init__(self, cfg: ASRConfig) -> None:
        super().__init__()
        self.fold = cfg.fold
        self.width = cfg.d_model // cfg.fold
        self.n_head = cfg.n_head // cfg.fold
        self.qkv = nn.Linear(self.width, 3 * self.width)
        self.proj = nn.Linear(self.width, self.width)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """x: (B, T, D) tokens; positions: (T*fold,) sub-token positions; mask: (B|1, T*fold,
        S) with S the past sub-tokens plus T*fold. Returns (y, (k, v)) with all S keys."""
        b = x.shape[0]
        q, k, v = split_even(self.qkv(fold_tokens(x, self.fold)), 3, dim=2)
        q, k, v = (t.view(b, -1, self.n_head, self.width // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # fmt: skip
        q, k = rotary(q, positions), rotary(k, positions)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        y = y.transpose(1, 2).reshape(b, -1, self.width)
        return unfold_tokens(self.proj(y), self.fold), (k, v)


class FoldingFeedForward(nn.Module):
    """Position-wise FFN; with `fold_ffn` on folded sub-tokens, its weights shrink by fold^2."""

    def __init__(self, cfg: ASRConfig) -> None:
        super().__init__()
        self.fold = cfg.fold if cfg.fold_ffn else 1
        width = cfg.d_model // self.fold
        self.up = nn.Linear(width, cfg.ffn_mult * width)
        self.down = nn.Linear(cfg.ffn_mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unfold_tokens(self.down(F.gelu(self.up(fold_tokens(x, self.fold)))), self.fold)


class Block(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, cfg: ASRConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = FoldingAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FoldingFeedForward(cfg)

    def forward(self, x, positions, mask, past=None):
        a, kv = self.attn(self.ln1(x), positions, mask, past)
        x = x + a
        return x + self.ffn(self.ln2(x)), kv


def chunk_mask(
    q_tokens: torch.Tensor, k_tokens: torch.Tensor, chunk: int, left_chunks: int
) -> torch.Tensor:
    """Block-causal mask (Lq, Lk): key token in the query's chunk or the `left_chunks` before."""
    cq, ck = q_tokens[:, None] // chunk, k_tokens[None, :] // chunk
    return (ck <= cq) & (ck >= cq - left_chunks)


@dataclass
class StreamState:
    """What a stream carries between chunks: conv caches, per-layer key/value caches (bounded
    by `left_chunks` chunks), the number of encoder frames emitted so far and, per row, the
    valid (unpadded) feature frames seen so far."""

    conv: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    frames: int = 0
    seen: torch.Tensor | None = None


# --- the model -------------------------------------------------------------------------------
class StreamingASR(nn.Module):
    """Log-mel features (B, T, n_mels) -> CTC logits (B, T/4, n_out) or class logits (B, n_out)."""

    def __init__(self, cfg: ASRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = CausalConv(cfg.n_mels, cfg.d_model)
        self.conv2 = CausalConv(cfg.d_model, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.n_out)

    def _frontend(self, feats: torch.Tensor, caches: list):
        x = ((feats - self.cfg.feat_mean) / self.cfg.feat_std).transpose(1, 2)
        x, c1 = self.conv1(x, caches[0])
        x, c2 = self.conv2(x, caches[1])
        return x.transpose(1, 2), [c1, c2]

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor | None = None):
        """Whole-utterance pass. Returns encoder output (B, T', D) and valid lengths (B,)."""
        cfg = self.cfg
        if lengths is None:
            lengths = torch.full((feats.shape[0],), feats.shape[1], device=feats.device)
        x, _ = self._frontend(feats, [None, None])
        t = x.shape[1]
        enc_lengths = subsampled_length(lengths)
        tokens = torch.arange(t * cfg.fold, device=x.device) // cfg.fold
        valid = tokens[None, :] < enc_lengths[:, None]  # (B, T*N) key validity
        mask = chunk_mask(tokens, tokens, cfg.chunk, cfg.left_chunks)[None] & valid[:, None]
        # A padded query may see no valid key; letting every position see itself avoids NaNs.
        mask = mask | torch.eye(t * cfg.fold, dtype=torch.bool, device=x.device)
        positions = torch.arange(t * cfg.fold, device=x.device)
        for block in self.blocks:
            x, _ = block(x, positions, mask)
        return self.ln_f(x), enc_lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x, enc_lengths = self.encode(feats, lengths)
        if self.cfg.head == "ctc":
            return self.out(x)
        valid = (torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]).float()
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.out(pooled)

    @torch.no_grad()
    def stream_step(
        self,
        feats: torch.Tensor,
        state: StreamState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, StreamState]:
        """Encode whole chunks of features (B, k * 4 * chunk frames, n_mels).

        A step must be whole chunks: the conv caches and the left-context cache are cut at
        chunk boundaries, so any other length would make later outputs wrong. Pad the last
        chunk of a stream and give `lengths`, the valid feature frames of each row in this
        step (padding only at the end of a row's stream); padded frames are never attended.
        Returns the new CTC logits (B, k * chunk, n_out), or, for the pooled head, the encoder
        output of the chunks (pool the valid frames across chunks for a keyword decision), and
        the state.
        """
        cfg = self.cfg
        step = SUBSAMPLING * cfg.chunk
        b, n = feats.shape[0], feats.shape[1]
        if n == 0 or n % step:
            raise ValueError(
                f"stream_step takes whole chunks of {step} feature frames (chunk={cfg.chunk} "
                f"encoder frames x {SUBSAMPLING}), got {n}: pad the last chunk, pass lengths"
            )
        if lengths is None:
            lengths = torch.full((b,), n, device=feats.device)
        if lengths.shape != (b,) or bool(((lengths < 0) | (lengths > n)).any()):
            raise ValueError(f"lengths must be ({b},) valid frames per row in 0..{n}")
        state = state or StreamState(kv=[None] * cfg.n_layer)
        full = state.frames * SUBSAMPLING  # feature frames of a row never padded
        seen = state.seen if state.seen is not None else torch.full_like(lengths, full)
        if bool(((seen < full) & (lengths > 0)).any()):
            raise ValueError("a row whose stream has ended (was padded) cannot get more frames")
        state.seen = seen + lengths
        x, state.conv = self._frontend(feats, state.conv)
        t = x.shape[1]
        new = torch.arange(state.frames, state.frames + t, device=x.device)
        past = state.kv[0][0].shape[2] // cfg.fold if state.kv[0] is not None else 0
        keys = torch.arange(state.frames - past, state.frames + t, device=x.device)
        q_tok = new.repeat_interleave(cfg.fold)
        k_tok = keys.repeat_interleave(cfg.fold)
        valid = k_tok[None, :] < subsampled_length(state.seen)[:, None]  # (B, S) key validity
        mask = chunk_mask(q_tok, k_tok, cfg.chunk, cfg.left_chunks)[None] & valid[:, None]
        # As in `encode`: a padded query sees itself, so it has a key and gives no NaN.
        own = torch.arange(len(q_tok), device=x.device)[:, None] + len(k_tok) - len(q_tok)
        mask = mask | (own == torch.arange(len(k_tok), device=x.device)[None, :])
        positions = new[0] * cfg.fold + torch.arange(t * cfg.fold, device=x.device)
        keep = cfg.left_chunks * cfg.chunk * cfg.fold  # sub-tokens of the visible left context
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, positions, mask, state.kv[i])
            start = max(k.shape[2] - keep, 0)
            state.kv[i] = (k[:, :, start:], v[:, :, start:])
        state.frames += t
        x = self.ln_f(x)
        return (self.out(x) if cfg.head == "ctc" else x), state

    def stream(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run utterances (B, T, n_mels) chunk by chunk, the last chunk padded and masked;
        returns the CTC logits `forward(feats, lengths)` gives, (B, ceil(T / 4), n_out)."""
        step = SUBSAMPLING * self.cfg.chunk
        b, n = feats.shape[0], feats.shape[1]
        if lengths is None:
            lengths = torch.full((b,), n, device=feats.device)
        padded = F.pad(feats, (0, 0, 0, -n % step), value=self.cfg.feat_mean)
        state, outs = None, []
        for start in range(0, padded.shape[1], step):
            valid = (lengths - start).clamp(0, step)
            y, state = self.stream_step(padded[:, start : start + step], state, valid)
            outs.append(y)
        return torch.cat(outs, dim=1)[:, : int(subsampled_length(torch.tensor(n)))]


def subsampled_length(lengths: torch.Tensor) -> torch.Tensor:
    """Encoder frames from feature frames: each stride-2 causal conv keeps ceil(T/2)."""
    return (lengths + 3) // 4


# --- decoding and metrics ------------------------------------------------------------------
def ctc_greedy(
    logits: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0
) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = logits.argmax(-1)
    out = []
    for i, row in enumerate(best.tolist()):
        n = len(row) if lengths is None else int(lengths[i])
        seq, prev = [], blank
        for tok in row[:n]:
            if tok != prev and tok != blank:
                seq.append(tok)
            prev = tok
        out.append(seq)
    return out


def edit_distance(ref: list | str, hyp: list | str) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev_diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (r != h))
    return row[-1]


def error_rate(refs: list[str], hyps: list[str], unit: str = "char") -> float:
    """CER (unit="char") or WER (unit="word"): total edits over total reference length."""
    split = (lambda s: s.split()) if unit == "word" else list
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps, strict=True))
    return edits / max(sum(len(split(r)) for r in refs), 1)
