"""MobileLLM: a deep and thin Llama-style decoder for on-device language modelling.

Liu et al., "MobileLLM: Optimizing Sub-billion Parameter Language Models for On-Device Use
Cases" (arXiv 2402.14905): at this size depth beats width, SwiGLU beats a plain MLP, sharing
the input and output embedding frees parameters for layers, grouped-query attention (GQA)
shrinks the KV cache, and immediate block-wise layer sharing (MobileLLM-LS: each block is run
twice in a row) adds depth without adding weights or weight traffic.

One file, gpt-fast style: a config dataclass, a static KV cache (one slot per *effective*
layer, so a shared block keeps two), and `run_layers`, which runs any span of layers so that
LayerSkip (layerskip.py, speculative.py) can exit early and resume. Module and parameter
names follow the Hugging Face Llama layout, so a HF checkpoint loads by stripping the
`model.` prefix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.tasks.layers import split_even

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# save_hf_checkpoint writes a layer-shared model unrolled (every effective layer its own
# entry, so stock transformers runs it as it is) and records the sharing under this key.
LAYER_REPEAT_KEY = "fedge_layer_repeat"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Llama checkpoints declare it (`rope_type` and its fields).

    linear: every frequency divided by `factor` (positions interpolated). llama3 (Llama 3.1
    and later): long wavelengths divided by `factor`, short ones kept, a smooth blend between,
    with the bands set by `low_freq_factor`, `high_freq_factor` and the pretraining length
    `original_max_position_embeddings`. dynamic (NTK): frequencies change only for sequences
    longer than max_position_embeddings, which is block_size here, so within the model's
    range it is plain RoPE; it is kept so a saved checkpoint says what it was.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ValueError(
                f"RoPE scaling type {self.rope_type!r} is not supported; fedge runs "
                f"{', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("llama3 RoPE needs high_freq_factor > low_freq_factor > 0")

    def hf(self) -> dict[str, float | int | str]:
        """The fields transformers writes in `rope_parameters` for this type."""
        out: dict[str, float | int | str] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out |= {
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        return out


@dataclass
class ModelConfig:
    """Shape of a MobileLLM decoder.

    n_layer counts distinct blocks; with `layer_repeat` = 2 (MobileLLM-LS) each block runs
    twice in a row, so the effective depth is n_layer * layer_repeat at the same weight count.
    `block_size` is the longest sequence (RoPE table and KV cache length).
    """

    vocab_size: int = 32000
    n_layer: int = 30
    dim: int = 576
    n_head: int = 9
    n_kv_head: int = 3
    ffn_dim: int = 1536
    block_size: int = 2048
    layer_repeat: int = 1
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} must be a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head} "
                "(GQA shares each key/value head among a group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.layer_repeat < 1:
            raise ValueError(f"layer_repeat must be >= 1, got {self.layer_repeat}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def depth(self) -> int:
        """Effective number of layers a token passes through."""
        return self.n_layer * self.layer_repeat

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Read a Hugging Face Llama / MobileLLM `config.json` dictionary.

        Missing keys take transformers' LlamaConfig defaults (untied embeddings, eps 1e-6,
        RoPE base 10000). RoPE settings are read from `rope_parameters` (transformers 5) or
        from the older top-level `rope_theta` and `rope_scaling`. Anything this decoder does
        not compute (biases, another head_dim or activation, partial rotary, an unsupported
        RoPE type) is refused rather than run wrongly.
        """
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        if head_dim * n_head != hf["hidden_size"]:
            raise ValueError(
                f"head_dim {head_dim} x {n_head} heads != hidden_size {hf['hidden_size']}: "
                "fedge's decoder needs head_dim = hidden_size / num_attention_heads"
            )
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"config.json sets {key}; fedge's decoder has no biases")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r}: fedge's SwiGLU uses silu")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if rope and all(isinstance(v, dict) for v in rope.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        scaling = None
        if rope_type != "default":
            if "factor" not in rope:
                raise ValueError(f"RoPE scaling type {rope_type!r} needs a factor")
            scaling = RopeScaling(rope_type=rope_type, factor=float(rope["factor"]))
            if rope_type == "llama3":
                scaling = replace(
                    scaling,
                    low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rope.get(
                            "original_max_position_embeddings",
                            hf.get("max_position_embeddings", 2048),
                        )
                    ),
                )
        # MobileLLM's own configs say share_embedding; Llama's say tie_word_embeddings, and
        # transformers' Llama default is untied.
        tie = hf.get("share_embedding", hf.get("tie_word_embeddings", False))
        repeat = hf.get(LAYER_REPEAT_KEY, 2 if hf.get("layer_sharing", False) else 1)
        n_layer = hf["num_hidden_layers"]
        if LAYER_REPEAT_KEY in hf:  # unrolled on save: num_hidden_layers counts every run
            if repeat < 1 or n_layer % repeat:
                raise ValueError(
                    f"{LAYER_REPEAT_KEY} {repeat} does not divide num_hidden_layers {n_layer}"
                )
            n_layer //= repeat
        return cls(
            vocab_size=hf["vocab_size"],
            n_layer=n_layer,
            dim=hf["hidden_size"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            ffn_dim=hf["intermediate_size"],
            block_size=hf.get("max_position_embeddings", 2048),
            layer_repeat=repeat,
            tie_embeddings=bool(tie),
            rope_base=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )


_TINY = ModelConfig(
    vocab_size=256, n_layer=6, dim=64, n_head=4, n_kv_head=2, ffn_dim=176, block_size=256
)
CONFIGS: dict[str, ModelConfig] = {
    # The paper's models (Table 9): 124.6M and 345.3M parameters; "-LS" shares blocks.
    "125M": ModelConfig(n_layer=30, dim=576, n_head=9, n_kv_head=3, ffn_dim=1536),
    "125M-LS": ModelConfig(
        n_layer=30, dim=576, n_head=9, n_kv_head=3, ffn_dim=1536, layer_repeat=2
    ),
    "350M": ModelConfig(n_layer=32, dim=960, n_head=15, n_kv_head=5, ffn_dim=2560),
    "350M-LS": ModelConfig(
        n_layer=32, dim=960, n_head=15, n_kv_head=5, ffn_dim=2560, layer_repeat=2
    ),
    # CPU-sized, byte vocabulary: what tests, the federated demo and the simulations train.
    "tiny": _TINY,
    "tiny-LS": replace(_TINY, layer_repeat=2),
    # The tiny ablation: about equal parameters (0.75M), deep-thin against wide-shallow.
    "tiny-deep": replace(_TINY, n_layer=16, block_size=512),
    "tiny-deep-LS": replace(_TINY, n_layer=16, block_size=512, layer_repeat=2),
    "tiny-wide": replace(_TINY, n_layer=4, dim=128, ffn_dim=352, block_size=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies (head_dim/2,) of RoPE, with Llama's scaling rules applied."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths above original/low_freq_factor are scaled down by factor, those
    # below original/high_freq_factor kept, and the band between blended linearly in
    # original/wavelength.
    wavelen = 2 * math.pi / inv_freq
    orig, lo, hi = (
        scaling.original_max_position_embeddings,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
    )
    smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def rope_table(
    seq_len: int, head_dim: int, base: float, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin, (seq_len, head_dim), in the half-split layout HF Llama checkpoints use."""
    inv_freq = rope_frequencies(head_dim, base, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by the position's angle."""
    x1, x2 = split_even(x, 2)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one effective layer, written in place at the given positions."""

    k: Tensor  # buffers, registered in __init__
    v: Tensor

    def __init__(self, batch: int, n_kv_head: int, seq_len: int, head_dim: int, dtype) -> None:
        super().__init__()
        shape = (batch, n_kv_head, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        self.k[:b, :, pos] = k
        self.v[:b, :, pos] = v
        return self.k[:b], self.v[:b]


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads (n_head / n_kv_head per group)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        pos: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            assert pos is not None, "a KV cache is read and written at given positions"
            k, v = cache.update(pos, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, pos=None, mask=None, cache=None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """The decoder. `forward(idx)` trains on whole sequences; `forward(idx, pos)` decodes
    through the KV cache set up by `setup_caches`."""

    rope_cos: Tensor  # buffers, registered in __init__ and setup_caches
    rope_sin: Tensor
    causal_mask: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        cos, sin = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.caches = nn.ModuleList()
        self.register_buffer("causal_mask", torch.ones(0, 0, dtype=torch.bool), persistent=False)
        self.apply(_init_weights)

    @property
    def depth(self) -> int:
        return self.config.depth

    def block(self, layer: int) -> Block:
        """The block that effective layer `layer` runs (immediate block-wise sharing)."""
        return cast(Block, self.layers[layer // self.config.layer_repeat])

    def setup_caches(self, batch: int, seq_len: int) -> None:
        """Allocate a static KV cache: one slot per effective layer, `seq_len` positions."""
        cfg = self.config
        if seq_len > cfg.block_size:
            raise ValueError(f"cache length {seq_len} exceeds block_size {cfg.block_size}")
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        self.caches = nn.ModuleList(
            KVCache(batch, cfg.n_kv_head, seq_len, cfg.head_dim, dtype).to(device)
            for _ in range(self.depth)
        )
        self.causal_mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))

    def embed(self, idx: Tensor) -> Tensor:
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens exceeds block_size {self.config.block_size}"
            )
        return self.embed_tokens(idx)

    def logits(self, h: Tensor) -> Tensor:
        """The shared exit: final norm, then the output embedding (tied to the input's)."""
        h = self.norm(h)
        return (
            self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed_tokens.weight)
        )

    def run_layers(
        self,
        x: Tensor,
        start: int,
        stop: int,
        pos: Tensor | None = None,
        skip: Tensor | None = None,
        keep: Iterable[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run effective layers [start, stop) on hidden states x (B, T, dim).

        pos: positions of the T tokens; given, the layers read and write the KV cache.
        skip: (B, depth) bool; a True entry passes that sample through that layer unchanged
        (LayerSkip's layer dropout). keep: layers whose output to return, for early exits.
        """
        if pos is None:
            cos, sin, mask = self.rope_cos[: x.shape[1]], self.rope_sin[: x.shape[1]], None
        else:
            if not len(self.caches):
                raise RuntimeError("decoding with positions needs setup_caches(batch, seq_len)")
            cos, sin, mask = self.rope_cos[pos], self.rope_sin[pos], self.causal_mask[pos]
        keep, kept = set(keep), {}
        for layer in range(start, stop):
            block = self.block(layer)
            cache = self.caches[layer] if pos is not None else None
            if skip is None or not skip[:, layer].any():
                x = block(x, cos, sin, pos, mask, cache)
            else:
                rows = (~skip[:, layer]).nonzero().squeeze(1)
                if len(rows):
                    x = x.index_put((rows,), block(x[rows], cos, sin, pos, mask, cache))
            if layer in keep:
                kept[layer] = x
        return x, kept

    def forward(self, idx: Tensor, pos: Tensor | None = None) -> Tensor:
        x, _ = self.run_layers(self.embed(idx), 0, self.depth, pos)
        return self.logits(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def build_model(name_or_config: str | ModelConfig) -> Transformer:
    """A fresh model from a named config (see CONFIGS), a ModelConfig, or a local folder
    holding a Hugging Face checkpoint (config.json + *.safetensors)."""
    if isinstance(name_or_config, ModelConfig):
        return Transformer(name_or_config)
    if name_or_config in CONFIGS:
        return Transformer(CONFIGS[name_or_config])
    if Path(name_or_config).is_dir():
        return load_hf_checkpoint(name_or_config)
    raise ValueError(
        f"unknown model config {name_or_config!r}; choose one of {sorted(CONFIGS)} "
        "or give a folder with a Hugging Face config.json and model.safetensors"
    )


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied or shared tensor counts once)."""
    return sum(p.numel() for p in model.parameters())


def load_hf_checkpoint(folder: str | Path) -> Transformer:
    """Load a Hugging Face Llama / MobileLLM checkpoint from a local folder.

    Reads config.json and model.safetensors (or the shards named in
    model.safetensors.index.json). HF keys are ours with a `model.` prefix. With tied
    embeddings an `lm_head.weight` in the file must equal the embedding (else the config
    and the weights disagree); untied, it must be there.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face checkpoint?")
    cfg = ModelConfig.from_hf(json.loads(cfg_path.read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor its index.json")
    hf_state: dict[str, Tensor] = {}
    for name in files:
        hf_state.update(load_file(str(folder / name)))
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state.get("embed_tokens.weight")
        if emb is None or not torch.equal(head, emb):
            raise ValueError(
                f"{cfg_path} ties the embeddings but lm_head.weight in the checkpoint differs "
                "from embed_tokens.weight; fix tie_word_embeddings"
            )
    if not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise ValueError(
            f"{cfg_path} does not tie the embeddings (tie_word_embeddings false or absent, as "
            "in transformers' Llama default) but the checkpoint has no lm_head.weight"
        )
    if cfg.layer_repeat > 1 and f"layers.{cfg.n_layer}.input_layernorm.weight" in state:
        state = _reshare_layers(state, cfg, cfg_path)
    with torch.device("meta"):
        model = Transformer(cfg)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {folder} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True)
    cos, sin = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos, sin
    model.causal_mask = torch.ones(0, 0, dtype=torch.bool)
    return model


def _reshare_layers(state: dict[str, Tensor], cfg: ModelConfig, where: Path) -> dict[str, Tensor]:
    """Fold an unrolled layer-shared checkpoint back: effective layers r*i .. r*i+r-1 must
    hold identical weights, and become block i."""
    r, out = cfg.layer_repeat, {}
    for key, value in state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, idx, rest = key.split(".", 2)
        layer = int(idx)
        first = state[f"layers.{layer - layer % r}.{rest}"]
        if not torch.equal(value, first):
            raise ValueError(
                f"{where} says {LAYER_REPEAT_KEY}={r}, but layer {layer} differs from layer "
                f"{layer - layer % r} in {rest}"
            )
        if layer % r == 0:
            out[f"layers.{layer // r}.{rest}"] = value
    return out


def save_hf_checkpoint(model: Transformer, folder: str | Path) -> None:
    """Write config.json + model.safetensors in the Hugging Face Llama layout (transformers
    5), so a model trained here loads as a pretrained base (e.g. for LoRA fine-tuning on
    devices) and stock `LlamaForCausalLM` computes the same logits.

    Stock Llama has no layer sharing, so a layer-shared model is written unrolled: each of
    its n_layer * layer_repeat effective layers gets its own copy of its block's weights
    (the file is larger, the logits the same), and `fedge_layer_repeat` records the sharing,
    which `load_hf_checkpoint` restores after checking the copies are identical.
    """
    from safetensors.torch import save_file

    cfg, folder = model.config, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rope: dict[str, float | int | str] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = cfg.rope_scaling.hf()
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if cfg.layer_repeat > 1:
        hf[LAYER_REPEAT_KEY] = cfg.layer_repeat
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            _, idx, rest = key.split(".", 2)
            for run in range(cfg.layer_repeat):  # clone: safetensors refuses shared storage
                layer = int(idx) * cfg.layer_repeat + run
                state[f"model.layers.{layer}.{rest}"] = value.detach().clone()
        elif key == "lm_head.weight":
            state[key] = value.detach().contiguous()
        else:
            state[f"model.{key}"] = value.detach().contiguous()
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def token_probs(logits: Tensor, temperature: float) -> Tensor:
    """The next-token distribution decoding samples from: softmax(logits / T), or at T = 0
    the one-hot of the argmax, so greedy decoding is sampling's limit and one code path
    (plain or speculative) serves both."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_token(weights: Tensor, generator: torch.Generator | None = None) -> int:
    """One token drawn in proportion to the non-negative `weights` (V,). A token that holds
    all the weight (greedy's one-hot) is returned without a draw, so greedy decoding leaves
    the random state alone."""
    top = int(weights.argmax())
    if weights[top] == weights.sum():
        return top
    return int(torch.multinomial(weights, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Plain decoding with the KV cache: prefill the prompt (1, P), then one token per full
    forward pass, greedy at temperature 0, else sampled from softmax(logits / temperature)
    with `generator`. Returns the new tokens (max_new_tokens,)."""
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    p = prompt.shape[1]
    model.setup_caches(1, p + max_new_tokens)
    if max_new_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=prompt.device)
    logits = model(prompt, torch.arange(p, device=prompt.device))
    out = [sample_token(token_probs(logits[0, -1], temperature), generator)]
    for i in range(max_new_tokens - 1):
        tok = torch.tensor([[out[-1]]], device=prompt.device)
        logits = model(tok, torch.tensor([p + i], device=prompt.device))
        out.append(sample_token(token_probs(logits[0, -1], temperature), generator))
    return torch.tensor(out, device=prompt.device)


def perplexity(loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats), capped to stay finite."""
    return math.exp(min(loss, 50.0))
