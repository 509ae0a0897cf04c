"""LayerSkip: dropout schedule, early-exit loss and curricula, self-speculative decoding."""

import pytest
import torch
import torch.nn.functional as F

from fedge.tasks.mobilellm.layerskip import (
    LayerSkipConfig,
    early_exit_loss,
    early_exit_scales,
    gradual_curriculum,
    layer_dropout_rates,
    layerskip_loss,
    rotational_curriculum,
    sample_layer_skip,
    self_speculative_generate,
)
from fedge.tasks.mobilellm.model import ModelConfig, Transformer, generate

CFG = ModelConfig(
    vocab_size=40, n_layer=6, dim=32, n_head=4, n_kv_head=2, ffn_dim=48, block_size=128
)


def model(seed=0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG.__dict__, **changes})).eval()


def test_layer_dropout_rises_exponentially_with_depth():
    p = layer_dropout_rates(5, 0.2)
    torch.testing.assert_close(p, 0.2 * (2 ** (torch.arange(5) / 4) - 1))
    assert p[0] == 0 and p[-1] == pytest.approx(0.2) and bool((p.diff() > 0).all())
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_rates(5, 1.5)
    g = torch.Generator().manual_seed(0)
    freq = sample_layer_skip(20000, p, g).float().mean(0)
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_skipped_layer_passes_the_sample_through():
    m = model()
    x = m.embed(torch.randint(0, 40, (2, 7)))
    skip = torch.zeros(2, 6, dtype=torch.bool)
    skip[0, 3] = True
    out, _ = m.run_layers(x, 0, 6, skip=skip)
    full, _ = m.run_layers(x, 0, 6)
    h, _ = m.run_layers(x[:1], 0, 3)
    without_3, _ = m.run_layers(h, 4, 6)
    torch.testing.assert_close(out[0], without_3[0])
    torch.testing.assert_close(out[1], full[1])


def test_early_exit_weights_and_curricula():
    e = early_exit_scales(4, 0.5)
    torch.testing.assert_close(e, torch.tensor([0.0, 0.5, 1.5, 3.0 + 1.5]))
    assert rotational_curriculum(5, 6, 2).tolist() == [False, True, False, True, False, True]
    assert rotational_curriculum(4, 6, 3).tolist() == [False, True, False, False, True, True]
    assert gradual_curriculum(0, 4, 80).tolist() == [False, False, False, True]
    assert gradual_curriculum(10, 4, 80).tolist() == [False, False, True, True]
    assert gradual_curriculum(40, 4, 80).all()
    with pytest.raises(ValueError, match="curriculum"):
        LayerSkipConfig(curriculum="sideways")


def test_early_exit_loss_weights_each_exit():
    m = model()
    idx, y = torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (2, 9))
    _, hidden = m.run_layers(m.embed(idx), 0, 6, keep=[2, 5])
    ce = {k: F.cross_entropy(m.logits(h).flatten(0, 1), y.flatten()) for k, h in hidden.items()}
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(early_exit_loss(m, hidden, y, w), (ce[2] + 3 * ce[5]) / 4)
    # With everything off it is the plain next-token loss.
    plain = F.cross_entropy(m(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(layerskip_loss(m, idx, y, LayerSkipConfig(), step=0), plain)


def test_layerskip_loss_trains_all_exits():
    m = model().train()
    cfg = LayerSkipConfig(
        dropout_max=0.2, early_exit_scale=1.0, curriculum="rotational", rotation=2
    )
    idx, y = torch.randint(0, 40, (4, 9)), torch.randint(0, 40, (4, 9))
    layerskip_loss(m, idx, y, cfg, step=0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize(
    "repeat,exit_layer,num_draft", [(1, 2, 3), (1, 5, 1), (2, 4, 5), (1, 1, 8)]
)
def test_self_speculative_equals_greedy(repeat, exit_layer, num_draft):
    m = model(seed=repeat + exit_layer, layer_repeat=repeat)
    prompt = torch.randint(0, 40, (1, 6))
    plain = generate(m, prompt, 30)
    spec, stats = self_speculative_generate(m, prompt, 30, exit_layer, num_draft)
    assert torch.equal(spec, plain)
    assert stats.verify_passes > 0 and 0 <= stats.accepted <= stats.drafted


def test_drafts_are_all_accepted_when_late_layers_are_identity():
    m = model()
    for block in m.layers[3:]:  # zero residual branches: layers 3..5 change nothing
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    prompt = torch.randint(0, 40, (1, 4))
    spec, stats = self_speculative_generate(m, prompt, 21, exit_layer=3, num_draft=4)
    assert torch.equal(spec, generate(m, prompt, 21))
    assert stats.acceptance_rate == 1.0 and stats.verify_passes == 4  # 1 + 4 * 5 tokens


@pytest.mark.parametrize("new_tokens", [0, 1, 2, 28])
def test_speculative_decodes_wherever_plain_decoding_fits(new_tokens):
    m = model(seed=3)
    prompt = torch.randint(0, 40, (1, 128 - new_tokens))  # prompt + new = block_size 128
    spec, stats = self_speculative_generate(m, prompt, new_tokens, exit_layer=2, num_draft=6)
    plain = generate(m, prompt, new_tokens)
    assert spec.shape == plain.shape == (new_tokens,)
    assert torch.equal(spec, plain)
    assert stats.drafted <= max(new_tokens - 1, 0)  # never a draft past the last wanted token
    with pytest.raises(ValueError, match="exceeds block_size"):
        self_speculative_generate(m, prompt, new_tokens + 1, exit_layer=2)


def test_speculative_rejects_bad_arguments():
    m = model()
    with pytest.raises(ValueError, match="exit_layer"):
        self_speculative_generate(m, torch.zeros(1, 3, dtype=torch.long), 5, exit_layer=6)
