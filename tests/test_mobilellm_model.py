"""MobileLLM model: sizes, layer sharing, GQA, KV cache, Hugging Face checkpoints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fedge.tasks.mobilellm.model import (
    CONFIGS,
    ModelConfig,
    RopeScaling,
    Transformer,
    build_model,
    generate,
    load_hf_checkpoint,
    num_parameters,
    save_hf_checkpoint,
)

TINY = ModelConfig(
    vocab_size=61, n_layer=3, dim=32, n_head=4, n_kv_head=2, ffn_dim=48, block_size=64
)


def tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY.__dict__, **changes}))


@pytest.mark.parametrize(
    "name,paper", [("125M", 124.6e6), ("125M-LS", 124.6e6), ("350M", 345.3e6), ("350M-LS", 345.3e6)]
)
def test_parameter_counts_match_paper(name, paper):
    with torch.device("meta"):
        model = build_model(name)
    assert abs(num_parameters(model) - paper) / paper < 0.01


def test_named_configs_shapes():
    assert (CONFIGS["125M"].depth, CONFIGS["125M-LS"].depth, CONFIGS["350M"].head_dim) == (
        30,
        60,
        64,
    )
    model = build_model("tiny")
    logits = model(torch.randint(0, 256, (2, 17)))
    assert logits.shape == (2, 17, 256)
    with pytest.raises(ValueError, match="unknown model config"):
        build_model("nope")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(n_head=9, n_kv_head=2)


def test_embedding_is_shared_with_output():
    model = tiny()
    assert model.lm_head is None
    assert num_parameters(model) == num_parameters(tiny(tie_embeddings=False)) - 61 * 32


def test_layer_sharing_reuses_weights():
    shared = tiny(layer_repeat=2)
    assert shared.depth == 6 and len(shared.layers) == 3
    assert all(shared.block(2 * i) is shared.block(2 * i + 1) for i in range(3))
    assert num_parameters(shared) == num_parameters(tiny())
    # The same as an unshared 6-layer model holding each block's weights twice in a row.
    unshared = tiny(n_layer=6)
    for i in range(6):
        unshared.layers[i].load_state_dict(shared.layers[i // 2].state_dict())
    unshared.embed_tokens.load_state_dict(shared.embed_tokens.state_dict())
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(shared(idx), unshared(idx))


def naive_rope(t, hd, base):
    """HF Llama's rotate-half RoPE at positions 0..t-1."""
    inv = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([torch.outer(torch.arange(t).float(), inv)] * 2, -1)

    def rope(z):
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return z * ang.cos() + torch.cat([-z2, z1], -1) * ang.sin()

    return rope


def naive_attention(attn, x):
    """Attention written out: k/v heads repeated per group, explicit causal softmax."""
    b, t, _ = x.shape
    h, kv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    rope = naive_rope(t, hd, 10000.0)

    q = rope(attn.q_proj(x).view(b, t, h, hd).transpose(1, 2))
    k = rope(attn.k_proj(x).view(b, t, kv, hd).transpose(1, 2)).repeat_interleave(h // kv, dim=1)
    v = attn.v_proj(x).view(b, t, kv, hd).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, h * hd))


def test_gqa_equals_naive_attention_with_repeated_heads():
    model = tiny()
    attn = model.layers[0].self_attn
    x = torch.randn(2, 9, 32)
    t = x.shape[1]
    ours = attn(x, model.rope_cos[:t], model.rope_sin[:t])
    torch.testing.assert_close(ours, naive_attention(attn, x))


@pytest.mark.parametrize("repeat", [1, 2])
def test_cached_decoding_equals_full_recomputation(repeat):
    model = tiny(layer_repeat=repeat).eval()
    idx = torch.randint(0, 61, (2, 12))
    full = model(idx)
    model.setup_caches(2, 20)
    chunks = [(0, 5), (5, 6), (6, 7), (7, 12)]  # a prefill, single tokens, a multi-token step
    cached = torch.cat([model(idx[:, a:b], torch.arange(a, b)) for a, b in chunks], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_generate_zero_tokens_returns_none_and_negative_is_refused():
    model = tiny().eval()
    seq = torch.randint(0, 61, (1, 5))
    out = generate(model, seq, 0)
    assert out.shape == (0,) and out.dtype == torch.long
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, seq, -1)


def test_generate_equals_greedy_full_recomputation():
    model = tiny().eval()
    seq = torch.randint(0, 61, (1, 5))
    new = generate(model, seq, 8)
    for tok in new:
        assert int(model(seq)[0, -1].argmax()) == int(tok)
        seq = torch.cat([seq, tok.view(1, 1)], dim=1)


def reference_llama(state, hf, idx):
    """HF Llama's forward, written from its definition over HF key names."""
    d, h, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd, t, eps = d // h, idx.shape[1], hf["rms_norm_eps"]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    rope = naive_rope(t, hd, hf["rope_theta"])
    x = state["model.embed_tokens.weight"][idx]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = norm(x, state[p + "input_layernorm.weight"])
        q = rope((a @ state[p + "self_attn.q_proj.weight"].T).view(1, t, h, hd).transpose(1, 2))
        k = rope((a @ state[p + "self_attn.k_proj.weight"].T).view(1, t, kv, hd).transpose(1, 2))
        v = (a @ state[p + "self_attn.v_proj.weight"].T).view(1, t, kv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(1, t, d) @ state[p + "self_attn.o_proj.weight"].T
        m = norm(x, state[p + "post_attention_layernorm.weight"])
        g, u = m @ state[p + "mlp.gate_proj.weight"].T, m @ state[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(g) * u) @ state[p + "mlp.down_proj.weight"].T
    return norm(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 50,
    "hidden_size": 24,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6,
}


def write_llama_folder(folder, hf: dict, lm_head: bool, seed: int = 1) -> dict:
    """A Llama checkpoint written by hand: config.json and random weights in HF names."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (50, 24), "model.norm.weight": (24,)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (24,),
            p + "post_attention_layernorm.weight": (24,),
            p + "self_attn.q_proj.weight": (24, 24),
            p + "self_attn.k_proj.weight": (8, 24),
            p + "self_attn.v_proj.weight": (8, 24),
            p + "self_attn.o_proj.weight": (24, 24),
            p + "mlp.gate_proj.weight": (40, 24),
            p + "mlp.up_proj.weight": (40, 24),
            p + "mlp.down_proj.weight": (24, 40),
        }
    if lm_head:
        shapes["lm_head.weight"] = (50, 24)
    state = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    return state


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("where", ["top level (transformers 4)", "rope_parameters (5)"])
def test_loads_hugging_face_checkpoint(tmp_path, tied, where):
    hf = {**HF_CONFIG, "tie_word_embeddings": tied}
    if where.startswith("top"):
        hf["rope_theta"] = 500.0
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    state = write_llama_folder(tmp_path, hf, lm_head=not tied)
    model = build_model(str(tmp_path))
    assert model.config.tie_embeddings is tied and model.config.n_kv_head == 2
    assert model.config.rope_base == 500.0 and model.config.rope_scaling is None
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    idx = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(2))
    want = reference_llama(state, {**hf, "rope_theta": 500.0}, idx)
    torch.testing.assert_close(model(idx), want, rtol=1e-4, atol=1e-4)


def test_missing_tie_key_means_untied_as_in_transformers(tmp_path):
    state = write_llama_folder(tmp_path, HF_CONFIG, lm_head=True)
    model = load_hf_checkpoint(tmp_path)
    assert model.config.tie_embeddings is False
    torch.testing.assert_close(model.lm_head.weight, state["lm_head.weight"])
    write_llama_folder(tmp_path, HF_CONFIG, lm_head=False)
    with pytest.raises(ValueError, match="does not tie the embeddings .* no lm_head.weight"):
        load_hf_checkpoint(tmp_path)


def test_tied_checkpoint_must_not_carry_a_different_lm_head(tmp_path):
    hf = {**HF_CONFIG, "tie_word_embeddings": True}
    state = write_llama_folder(tmp_path, hf, lm_head=True)
    with pytest.raises(ValueError, match="lm_head.weight in the checkpoint differs"):
        load_hf_checkpoint(tmp_path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_hf_checkpoint(tmp_path)  # a tied checkpoint that keeps the copy loads
    assert model.lm_head is None


@pytest.mark.parametrize(
    "rope,message",
    [
        ({"rope_type": "yarn", "factor": 4.0}, "RoPE scaling type 'yarn' is not supported"),
        ({"type": "longrope", "factor": 2.0}, "RoPE scaling type 'longrope' is not supported"),
        ({"rope_type": "linear"}, "'linear' needs a factor"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_rope_is_refused_by_name(tmp_path, rope, message):
    write_llama_folder(tmp_path, {**HF_CONFIG, "rope_scaling": rope}, lm_head=True)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"attention_bias": True}, "attention_bias; fedge's decoder has no biases"),
        ({"head_dim": 8}, "head_dim 8 x 6 heads != hidden_size 24"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_llama_variants_this_decoder_does_not_compute_are_refused(tmp_path, changes, message):
    write_llama_folder(tmp_path, {**HF_CONFIG, **changes}, lm_head=True)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)


def test_unrolled_layer_sharing_is_checked_on_load(tmp_path):
    model = tiny(layer_repeat=2, tie_embeddings=False)
    save_hf_checkpoint(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["num_hidden_layers"] == 6 and hf["fedge_layer_repeat"] == 2
    assert "layer_sharing" not in hf  # stock Llama would ignore it and run 3 layers
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(
        state["model.layers.4.mlp.up_proj.weight"], state["model.layers.5.mlp.up_proj.weight"]
    )
    state["model.layers.5.mlp.up_proj.weight"] += 1.0
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layer 5 differs from layer 4 in mlp.up_proj.weight"):
        load_hf_checkpoint(tmp_path)


def test_checkpoint_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "tie_word_embeddings": True,
            }
        )
    )
    save_file(
        {"model.embed_tokens.weight": torch.zeros(10, 8)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(ValueError, match="missing"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"layer_repeat": 2, "tie_embeddings": False},
        {"rope_base": 5e5, "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 32)},
        {"rope_scaling": RopeScaling("linear", 2.0)},
    ],
)
def test_saved_checkpoint_loads_back(tmp_path, changes):
    model = tiny(**changes)
    save_hf_checkpoint(model, tmp_path)
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(loaded(idx), model(idx))
