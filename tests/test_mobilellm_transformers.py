"""MobileLLM against stock Hugging Face transformers (5.x, the `dev` extra), both ways: folders
transformers writes load here with the same logits, and folders fedge writes run in
transformers' LlamaForCausalLM with the same logits. Everything is local (no hub)."""

import json
import os

import pytest
import torch
import transformers  # the dev extra installs it

from fedge.tasks.mobilellm.model import (
    ModelConfig,
    RopeScaling,
    Transformer,
    load_hf_checkpoint,
    save_hf_checkpoint,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every folder is local

# head_dim 16 gives 8 RoPE frequencies; at base 5e5 and an original length of 64, llama3
# scaling keeps the shortest wavelength (6.3), blends the next (32.5) and divides the rest.
SHAPE = dict(
    vocab_size=70,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=96,
    rms_norm_eps=1e-5,
)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5e5},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 5e5,
    },
}


def perturb(model: torch.nn.Module) -> None:
    """Weights far from init (norms around 1, matrices at std 0.15), so attention is sharp
    and a wrong RoPE frequency or a misread weight moves the logits well past tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)


def hf_logits(folder, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(idx).logits


def random_idx(t: int = 96) -> torch.Tensor:
    return torch.randint(0, 70, (2, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_loads_folders_transformers_writes(tmp_path, rope, tied):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **SHAPE, rope_parameters=dict(ROPES[rope]), tie_word_embeddings=tied
    )
    hf = transformers.LlamaForCausalLM(cfg)
    perturb(hf)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_theta"] == ROPES[rope]["rope_theta"]
    assert "rope_theta" not in written  # transformers 5 writes it inside rope_parameters

    ours = load_hf_checkpoint(tmp_path).eval()
    assert ours.config.rope_base == ROPES[rope]["rope_theta"]
    assert ours.config.tie_embeddings is tied
    idx = random_idx()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_logits(tmp_path, idx), rtol=1e-4, atol=1e-4)


def test_missing_tie_key_loads_untied_like_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    perturb(hf)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    del written["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    ours = load_hf_checkpoint(tmp_path).eval()
    assert ours.lm_head is not None
    idx = random_idx(20)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_logits(tmp_path, idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_embeddings": False},
        {"layer_repeat": 2},
        {"layer_repeat": 2, "tie_embeddings": False, "rope_base": 5e5,
         "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 64)},
        {"rope_scaling": RopeScaling("linear", 4.0)},
    ],
)  # fmt: skip
def test_transformers_reproduces_what_fedge_saves(tmp_path, changes):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=70, n_layer=3, dim=64, n_head=4, n_kv_head=2, ffn_dim=96, block_size=96
    )
    model = Transformer(ModelConfig(**{**cfg.__dict__, **changes})).eval()
    perturb(model)
    save_hf_checkpoint(model, tmp_path)
    idx = random_idx()
    with torch.no_grad():
        want = model(idx)
        torch.testing.assert_close(hf_logits(tmp_path, idx), want, rtol=1e-4, atol=1e-4)
        back = load_hf_checkpoint(tmp_path).eval()
        assert back.config == model.config
        torch.testing.assert_close(back(idx), want)
