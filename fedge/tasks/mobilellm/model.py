"""MobileLLM: a deep and thin Llama-style decoder for on-device language modelling.

Liu et al., "MobileLLM: Optimizing Sub-billion Parameter Language Models for On-Device Use
Cases" (arXiv 2402.14905): at this size depth beats width, SwiGLU beats a plain MLP, sharing
the input and output embedding frees parameters for layers, grouped-query attention (GQA)
shrinks the KV cache, and immediate block-wise layer sharing (MobileLLM-LS: each block is run
twice in a row) adds depth without adding weights or weight traffic.

One file, gpt-fast style: a config dataclass, a static KV cache (one slot per *effective*
layer, so a shared block keeps two), and `run_layers`, which runs any span of layers so that
LayerSkip (see layerskip.py) can exit early and resume. Module and parameter names follow the
Hugging Face Llama layout, so a HF checkpoint loads by stripping the `model.` prefix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        """Read a Hugging Face Llama / MobileLLM `config.json` dictionary."""
        tie = hf.get("share_embedding", hf.get("tie_word_embeddings", True))
        return cls(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            dim=hf["hidden_size"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            ffn_dim=hf["intermediate_size"],
            block_size=hf.get("max_position_embeddings", 2048),
            layer_repeat=2 if hf.get("layer_sharing", False) else 1,
            tie_embeddings=bool(tie),
            rope_base=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
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


def rope_table(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (seq_len, head_dim), in the half-split layout HF Llama checkpoints use."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one effective layer, written in place at the given positions."""

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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        )
        cos, sin = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base)
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
        return self.layers[layer // self.config.layer_repeat]

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
    model.safetensors.index.json). HF keys are ours with a `model.` prefix; `lm_head.weight`
    is used only when the embedding is not shared.
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
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
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
    cos, sin = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base)
    model.rope_cos, model.rope_sin = cos, sin
    model.causal_mask = torch.ones(0, 0, dtype=torch.bool)
    return model


def save_hf_checkpoint(model: Transformer, folder: str | Path) -> None:
    """Write config.json + model.safetensors in the Hugging Face Llama layout, so a model
    trained here loads as a pretrained base (e.g. for LoRA fine-tuning on devices)."""
    from safetensors.torch import save_file

    cfg, folder = model.config, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "layer_sharing": cfg.layer_repeat == 2,
        "hidden_act": "silu",
    }
    if cfg.layer_repeat not in (1, 2):
        raise ValueError(f"HF configs express layer_repeat 1 or 2, not {cfg.layer_repeat}")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    state = {f"model.{k}" if k != "lm_head.weight" else k: v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


@torch.inference_mode()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int) -> Tensor:
    """Plain greedy decoding with the KV cache: prefill the prompt (1, P), then one token
    per full forward pass. Returns the new tokens (max_new_tokens,)."""
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must have shape (1, P), got {tuple(prompt.shape)}")
    p = prompt.shape[1]
    model.setup_caches(1, p + max_new_tokens)
    logits = model(prompt, torch.arange(p, device=prompt.device))
    out = [int(logits[0, -1].argmax())]
    for i in range(max_new_tokens - 1):
        tok = torch.tensor([[out[-1]]], device=prompt.device)
        logits = model(tok, torch.tensor([p + i], device=prompt.device))
        out.append(int(logits[0, -1].argmax()))
    return torch.tensor(out, device=prompt.device)


def perplexity(loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats), capped to stay finite."""
    return math.exp(min(loss, 50.0))
