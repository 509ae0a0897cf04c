"""LayerSkip training: the layer dropout schedule p(l, t), early-exit loss and curricula."""

import pytest
import torch
import torch.nn.functional as F

from fedge.tasks.mobilellm.early_exit import (
    early_exit_loss,
    early_exit_scales,
    gradual_curriculum,
    rotational_curriculum,
)
from fedge.tasks.mobilellm.layer_dropout import (
    dropout_time_scale,
    layer_dropout_rates,
    sample_layer_skip,
)
from fedge.tasks.mobilellm.layerskip import LayerSkipConfig, layerskip_loss


def test_layer_dropout_rises_exponentially_with_depth():
    p = layer_dropout_rates(5, 0.2)
    torch.testing.assert_close(p, 0.2 * (2 ** (torch.arange(5) / 4) - 1))
    assert p[0] == 0 and p[-1] == pytest.approx(0.2) and bool((p.diff() > 0).all())
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_rates(5, 1.5)
    g = torch.Generator().manual_seed(0)
    freq = sample_layer_skip(20000, p, g).float().mean(0)
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_dropout_time_curriculum_matches_hand_computed_values():
    # S(t) = e^(t ln2 / T) - 1: 0 at t = 0, 2^(1/2) - 1 half way, 1 at T and after.
    exp = [dropout_time_scale(t, 100, "exp") for t in (0, 25, 50, 100, 150)]
    assert exp == pytest.approx([0.0, 0.189207115, 0.414213562, 1.0, 1.0])
    assert dropout_time_scale(0, 100) == dropout_time_scale(77, 100, "constant") == 1.0
    # p(l, t) = S(t) D(l) p_max, L = 3, p_max 0.2, t = T/2: D = (0, 2^(1/2) - 1, 1).
    cfg = LayerSkipConfig(dropout_max=0.2, dropout_curriculum="exp", curriculum_steps=100)
    torch.testing.assert_close(
        cfg.dropout_rates(50, 3), torch.tensor([0.0, 0.0343146, 0.0828427]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(cfg.dropout_rates(100, 3), layer_dropout_rates(3, 0.2))
    with pytest.raises(ValueError, match="layer dropout curriculum"):
        LayerSkipConfig(dropout_curriculum="cosine")
    with pytest.raises(ValueError, match="curriculum_steps"):
        dropout_time_scale(0, 0, "exp")


def test_exp_curriculum_drops_no_layer_at_the_first_step(tiny_decoder):
    m = tiny_decoder().train()
    idx, y = torch.randint(0, 40, (4, 9)), torch.randint(0, 40, (4, 9))
    cfg = LayerSkipConfig(dropout_max=0.5, dropout_curriculum="exp", curriculum_steps=10)
    plain = F.cross_entropy(m(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(layerskip_loss(m, idx, y, cfg, step=0), plain)
    torch.manual_seed(0)  # at t = T the rates are D(l) p_max: the last layers get skipped
    assert not torch.allclose(layerskip_loss(m, idx, y, cfg, step=10), plain)


def test_skipped_layer_passes_the_sample_through(tiny_decoder):
    m = tiny_decoder()
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


def test_early_exit_loss_weights_each_exit(tiny_decoder):
    m = tiny_decoder()
    idx, y = torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (2, 9))
    _, hidden = m.run_layers(m.embed(idx), 0, 6, keep=[2, 5])
    ce = {k: F.cross_entropy(m.logits(h).flatten(0, 1), y.flatten()) for k, h in hidden.items()}
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(early_exit_loss(m, hidden, y, w), (ce[2] + 3 * ce[5]) / 4)
    # With everything off it is the plain next-token loss.
    plain = F.cross_entropy(m(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(layerskip_loss(m, idx, y, LayerSkipConfig(), step=0), plain)


def test_layerskip_loss_trains_all_exits(tiny_decoder):
    m = tiny_decoder().train()
    cfg = LayerSkipConfig(
        dropout_max=0.2, early_exit_scale=1.0, curriculum="rotational", rotation=2
    )
    idx, y = torch.randint(0, 40, (4, 9)), torch.randint(0, 40, (4, 9))
    layerskip_loss(m, idx, y, cfg, step=0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
