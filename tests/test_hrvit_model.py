"""HRViT model: branch shapes, stripe attention against a naive masked attention, sizes."""

import pytest
import torch

from fedge.tasks.hrvit.model import (
    CONFIGS,
    HRViTAttention,
    HRViTConfig,
    build_model,
    stripe_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_stripe_attention(q, kv, heads, window):
    """Full attention over all H*W tokens, masked to each token's stripe, head by head."""
    b, h, w, c = q.shape
    d = c // heads
    rows = torch.arange(h).repeat_interleave(w)  # token index -> row
    cols = torch.arange(w).repeat(h)
    same_row_stripe = (rows[:, None] // window) == (rows[None, :] // window)
    same_col_stripe = (cols[:, None] // window) == (cols[None, :] // window)
    qf, kf = q.reshape(b, h * w, heads, d), kv.reshape(b, h * w, heads, d)
    out = torch.empty_like(qf)
    for head in range(heads):
        mask = same_row_stripe if head < heads // 2 else same_col_stripe
        scores = qf[:, :, head] @ kf[:, :, head].transpose(1, 2) / d**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ kf[:, :, head]
    return out.reshape(b, h, w, c)


@pytest.mark.parametrize(
    ("h", "w", "heads", "window"),
    [(8, 8, 2, 2), (7, 5, 4, 3), (6, 10, 2, 1), (4, 4, 2, 7), (9, 6, 4, 4)],
)
def test_stripe_attention_equals_naive_masked_attention(h, w, heads, window):
    torch.manual_seed(0)
    q = torch.randn(2, h, w, 8 * heads, dtype=torch.float64)
    kv = torch.randn(2, h, w, 8 * heads, dtype=torch.float64)
    got = stripe_attention(q, kv, heads, window)
    want = naive_stripe_attention(q, kv, heads, window)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_zero_initialised_batchnorm_makes_attention_branch_start_at_zero():
    attn = HRViTAttention(dim=16, heads=2, window=2)
    out = attn(torch.randn(2, 6, 6, 16))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (72, 40), (50, 70)])
def test_tiny_shapes_at_every_branch_and_stage(height, width):
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = build_model("tiny").eval()
    x = torch.randn(2, 3, height, width)
    stages = model.features(x)
    assert len(stages) == 4
    h, w = height, width
    expected = []
    for _ in range(2):  # the stem halves twice (stride-2 convs round up)
        h, w = (h + 1) // 2, (w + 1) // 2
    for k, branches in enumerate(stages):
        expected.append((cfg.channels[k], h, w))
        assert [tuple(t.shape) for t in branches] == [(2, *e) for e in expected]
        h, w = (h + 1) // 2, (w + 1) // 2
    logits = model(x)
    assert logits.shape == (2, cfg.num_classes, height, width)
    assert torch.isfinite(logits).all()


# The paper's ADE20K table (SegFormer head, 150 classes): parameters in millions.
PAPER_PARAMS = {"b1": 8.2, "b2": 20.8, "b3": 28.7}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper_within_5_percent(name):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, num_classes=150)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.05, params


def test_b1_runs_on_a_small_image():
    model = build_model("b1", num_classes=150).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 150, 64, 64)


def test_bad_configs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="unknown HRViT config"):
        build_model("b9")
    with pytest.raises(ValueError, match="heads must be even"):
        HRViTConfig(heads=(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"blocks\[2\] needs 3 entries"):
        HRViTConfig(blocks=((1,), (1, 1), (1, 1), (1, 1, 1, 1)))
    with pytest.raises(ValueError, match="bad HRViT config override"):
        build_model("tiny", depth=3)


def test_peers_share_the_tiny_parameter_budget_and_output_shape():
    from fedge.tasks.hrvit.baselines import PlainViT, SmallUNet

    def count(m):
        return sum(p.numel() for p in m.parameters())

    budget = count(build_model("tiny"))
    x = torch.randn(2, 3, 64, 64)
    for peer in (PlainViT(8, 64), SmallUNet(8, width=19)):
        assert abs(count(peer) - budget) / budget < 0.05
        assert peer(x).shape == (2, 8, 64, 64)
    with pytest.raises(ValueError, match="built for 256 patches"):
        PlainViT(8, 64)(torch.randn(1, 3, 32, 32))
