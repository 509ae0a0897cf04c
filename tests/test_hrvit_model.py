"""HRViT model: branch shapes, stripe attention against a naive masked attention, sizes."""

import pytest
import torch

from fedge.tasks.hrvit.model import (
    CONFIGS,
    DES,
    HRViTAttention,
    HRViTBlock,
    HRViTConfig,
    build_model,
    stripe_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_stripe_attention(q, kv, heads, window):
    """Full attention over all H*W tokens, masked to each token's stripe, head by head:
    `heads` heads on the first half of the channels in row stripes, `heads` on the second
    half in column stripes."""
    b, h, w, c = q.shape
    total = 2 * heads
    d = c // total
    rows = torch.arange(h).repeat_interleave(w)  # token index -> row
    cols = torch.arange(w).repeat(h)
    same_row_stripe = (rows[:, None] // window) == (rows[None, :] // window)
    same_col_stripe = (cols[:, None] // window) == (cols[None, :] // window)
    qf, kf = q.reshape(b, h * w, total, d), kv.reshape(b, h * w, total, d)
    out = torch.empty_like(qf)
    for head in range(total):
        mask = same_row_stripe if head < heads else same_col_stripe
        scores = qf[:, :, head] @ kf[:, :, head].transpose(1, 2) / d**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ kf[:, :, head]
    return out.reshape(b, h, w, c)


@pytest.mark.parametrize(
    ("h", "w", "heads", "window"),
    [(8, 8, 1, 2), (7, 5, 2, 3), (6, 10, 1, 1), (4, 4, 1, 7), (9, 6, 2, 4)],
)
def test_stripe_attention_equals_naive_masked_attention(h, w, heads, window):
    torch.manual_seed(0)
    q = torch.randn(2, h, w, 16 * heads, dtype=torch.float64)
    kv = torch.randn(2, h, w, 16 * heads, dtype=torch.float64)
    got = stripe_attention(q, kv, heads, window)
    want = naive_stripe_attention(q, kv, heads, window)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_zero_initialised_batchnorm_makes_attention_path_start_at_zero():
    attn = HRViTAttention(dim=16, head_dim=8, window=2)
    out = attn(torch.randn(2, 6, 6, 16))
    assert torch.equal(out, torch.zeros_like(out))
    block = HRViTBlock(16, head_dim=8, window=2, ratio=2)
    x = torch.randn(2, 6, 6, 16)
    with torch.no_grad():  # at init the block is x + DES(x), then the MixCFN residual
        h = x + block.des(x)
        torch.testing.assert_close(block(x), h + block.cfn(block.norm2(h)))


def test_des_is_a_factorised_linear_map_on_the_block_input():
    des = DES(240)  # b2's 1/16 branch: 240 = 15 x 16
    assert (des.p, des.left.in_features) == (16, 15)
    assert sum(p.numel() for p in des.parameters()) == 16 * 16 + 16 + 15 * 15 + 15
    x = torch.randn(3, 240, dtype=torch.float64)
    des = des.double()
    y = torch.nn.functional.gelu(x.view(3, 15, 16) @ des.right.weight.T + des.right.bias)
    want = (y.transpose(1, 2) @ des.left.weight.T + des.left.bias).transpose(1, 2).flatten(1)
    torch.testing.assert_close(des(x), want)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (72, 40), (50, 70)])
def test_tiny_shapes_at_every_branch_and_stage(height, width):
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = build_model("tiny").eval()
    x = torch.randn(2, 3, height, width)
    stages = model.features(x)
    assert [len(s) for s in stages] == [1, 2, 3, 3, 4, 4]
    sides = [(-(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2))) for i in range(4)]
    for branches in stages:
        want = [(2, cfg.channels[i], *sides[i]) for i in range(len(branches))]
        assert [tuple(t.shape) for t in branches] == want
    logits = model(x)
    assert logits.shape == (2, cfg.num_classes, height, width)
    assert torch.isfinite(logits).all()


def test_b1_stages_and_one_block_match_the_description():
    """b1 at 512x512 (meta device): six stages with 1, 2, 3, 3, 4, 4 branches at 1/4 ...
    1/32 (128, 64, 32, 16 px) of widths 32-256; blocks per branch (6, 5, 20, 4); a block
    keeps its input's shape; fusion downsamples with one depthwise conv of kernel 2^k+1 and
    stride 2^k; a stage that opens a branch builds it from every branch."""
    with torch.device("meta"):
        model = build_model("b1", num_classes=150)
        stages = model.features(torch.zeros(1, 3, 512, 512))
        block = model.stages[4].branches[1][0]
        x = torch.zeros(2, 64, 64, 64)
        assert block(x).shape == x.shape
    widths, sides = (32, 64, 128, 256), (128, 64, 32, 16)
    for n, branches in zip([1, 2, 3, 3, 4, 4], stages, strict=True):
        assert [tuple(t.shape) for t in branches] == [
            (1, widths[i], sides[i], sides[i]) for i in range(n)
        ]
    per_branch = [sum(len(s.branches[i]) for s in model.stages if i < len(s.branches))
                  for i in range(4)]  # fmt: skip
    assert per_branch == [6, 5, 20, 4]
    heads = [2 * model.stages[5].branches[i][0].attn.heads for i in range(4)]
    assert heads == [2, 2, 4, 8]  # width / 32, and one head per stripe direction at least
    assert isinstance(model.stem[2], torch.nn.ReLU) and model.stem[0].out_channels == 32
    opening = model.stages[4].fuse.paths[3]  # the new 1/32 branch, from all three inputs
    assert len(opening) == 3
    for j, path in enumerate(opening):
        down = path[0]
        k = 2 ** (3 - j)
        assert (down.kernel_size, down.stride, down.groups) == ((k + 1, k + 1), (k, k), widths[j])


def test_b2_heads_and_mlp_ratios_match_the_paper():
    with torch.device("meta"):
        model = build_model("b2", num_classes=150)
    last = model.stages[5]
    assert [2 * last.branches[i][0].attn.heads for i in range(4)] == [2, 4, 10, 16]
    assert [last.branches[i][0].cfn.fc1.out_features for i in range(4)] == [96, 288, 720, 1152]


# The reference models (backbone + 150-class SegFormer head), counted from the authors'
# configs: 8.183M, 20.810M, 28.724M; backbones 7.758M, 20.311M, 25.508M.
REFERENCE = {"b1": (8.183e6, 7.758e6), "b2": (20.810e6, 20.311e6), "b3": (28.724e6, 25.508e6)}
OURS = {"b1": 8_183_118, "b2": 20_809_782, "b3": 28_724_494}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_counts_match_the_reference_within_half_a_percent(name):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, num_classes=150)
    total = sum(p.numel() for p in model.parameters())
    backbone = total - sum(p.numel() for p in model.head.parameters())
    assert total == OURS[name]
    assert abs(total - REFERENCE[name][0]) / REFERENCE[name][0] < 0.005
    assert abs(backbone - REFERENCE[name][1]) / REFERENCE[name][1] < 0.005


def test_b1_runs_on_a_small_image():
    model = build_model("b1", num_classes=150).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 150, 64, 64)


def test_bad_configs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="unknown HRViT config"):
        build_model("b9")
    with pytest.raises(ValueError, match="at most head_dim 32 or a multiple of it"):
        HRViTConfig(channels=(32, 64, 96, 256))
    with pytest.raises(ValueError, match="the first stage has 1 branch and the last all 4"):
        HRViTConfig(blocks=((1,), (1, 1), (1, 1, 1)))
    with pytest.raises(ValueError, match="a stage adds at most one branch"):
        HRViTConfig(blocks=((1,), (1, 1, 1), (1, 1, 1, 1)))
    with pytest.raises(ValueError, match="bad HRViT config override"):
        build_model("tiny", depth=3)


def test_peers_share_the_tiny_parameter_budget_and_output_shape():
    from fedge.tasks.hrvit.baselines import PlainViT, SmallUNet

    def count(m):
        return sum(p.numel() for p in m.parameters())

    budget = count(build_model("tiny"))
    x = torch.randn(2, 3, 64, 64)
    for peer in (PlainViT(8, 64, dim=72), SmallUNet(8, width=21)):
        assert abs(count(peer) - budget) / budget < 0.05
        assert peer(x).shape == (2, 8, 64, 64)
    with pytest.raises(ValueError, match="built for 256 patches"):
        PlainViT(8, 64)(torch.randn(1, 3, 32, 32))
