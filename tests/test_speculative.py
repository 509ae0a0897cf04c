"""Self-speculative decoding: greedy equals plain greedy; sampled is distributed as plain
sampling (checked against the exact distribution); acceptance on held-out text."""

import pytest
import torch
from scipy.stats import chi2

from fedge.tasks.mobilellm.model import Transformer, generate
from fedge.tasks.mobilellm.speculative import heldout_acceptance, self_speculative_generate

pytestmark = pytest.mark.usefixtures("one_thread")
V = 6  # a vocabulary small enough to enumerate every 4-token continuation


def peaked(tiny_decoder, seed=11) -> Transformer:
    """A 4-layer decoder with large random weights: sharp next-token distributions that
    differ between exit 2 and the last layer, so a wrong sampler shows."""
    m = tiny_decoder(seed=seed, vocab_size=V, n_layer=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.35)
    return m


def exact_joint(m: Transformer, prompt, n: int, layers: int, temperature: float):
    """P(t1..tn | prompt), shape (V,)*n, for sampling every token from exit `layers`."""
    seqs = torch.cartesian_prod(*[torch.arange(V)] * (n - 1))  # every t1..t_{n-1}
    idx = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        h, _ = m.run_layers(m.embed(idx), 0, layers)
        cond = torch.softmax(m.logits(h)[:, prompt.shape[1] - 1 :].double() / temperature, -1)
    prefix = cond[:, :-1].gather(2, seqs[:, :, None]).squeeze(-1).prod(-1)  # P(t1..t_{n-1})
    return (prefix[:, None] * cond[:, -1]).reshape((V,) * n)


def chi2_pvalue(samples, joint, dims: tuple[int, ...]) -> float:
    """Goodness of fit of the samples' marginal over `dims` to the joint's (cells expected
    below 5 pooled into one)."""
    others = [d for d in range(joint.ndim) if d not in dims]
    expected = (joint.sum(others) if others else joint).flatten() * len(samples)
    cell = torch.zeros(len(samples), dtype=torch.long)
    for d in dims:
        cell = cell * V + samples[:, d]
    observed = torch.bincount(cell, minlength=V ** len(dims)).double()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


MARGINALS = [(0,), (1,), (2,), (3,), (1, 2), (2, 3)]


@pytest.mark.parametrize(
    "sampler,draws,power",
    [
        ("speculative", 500, 1e-3),
        pytest.param("speculative", 3000, 1e-6, marks=pytest.mark.slow),
        pytest.param("plain", 3000, 1e-6, marks=pytest.mark.slow),
    ],
)
def test_sampling_is_distributed_as_the_full_model(tiny_decoder, sampler, draws, power):
    """4 tokens at temperature 0.7: t1 from the prefill, t2 and t3 drafted by exit 2 and
    verified (kept, or replaced from max(0, p - q)), t4 the bonus token or the next step's.
    Compared with the exact distribution, enumerated; `power`: how surely the same samples
    reject exit 2's own distribution (500 draws: 7-35 s here by load; 3000: 100-160 s)."""
    m, temperature = peaked(tiny_decoder), 0.7
    prompt = torch.tensor([[1, 4, 2, 0, 3]])
    g = torch.Generator().manual_seed(2024)
    if sampler == "plain":
        out = [generate(m, prompt, 4, temperature, g) for _ in range(draws)]
    else:
        out = [
            self_speculative_generate(m, prompt, 4, 2, 2, temperature, g)[0] for _ in range(draws)
        ]
    samples = torch.stack(out)
    full = exact_joint(m, prompt, 4, m.depth, temperature)
    for dims in MARGINALS:
        assert chi2_pvalue(samples, full, dims) > 1e-3, dims
    # The test can tell: exit 2's own distribution is far off, and the samples reject it.
    draft = exact_joint(m, prompt, 4, 2, temperature)
    assert 0.5 * float((full - draft).abs().sum()) > 0.2
    assert chi2_pvalue(samples, draft, (1, 2)) < power


def test_sampling_repeats_with_the_seed_and_greedy_leaves_the_rng_alone(tiny_decoder):
    m, prompt = peaked(tiny_decoder), torch.tensor([[1, 4, 2]])
    runs = [
        self_speculative_generate(m, prompt, 12, 2, 3, 1.0, torch.Generator().manual_seed(5))[0]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    generate(m, prompt, 12)
    self_speculative_generate(m, prompt, 12, exit_layer=2, num_draft=3)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, prompt, 3, temperature=-1.0)


def test_heldout_acceptance_of_one_greedy_draft_is_exit_agreement(tiny_decoder):
    m = peaked(tiny_decoder, seed=3)
    windows = torch.randint(0, V, (64, 20), generator=torch.Generator().manual_seed(0))
    accepted = heldout_acceptance(m, windows, exit_layer=2, num_draft=1, prefix_lens=[8, 15])
    with torch.no_grad():
        _, h = m.run_layers(m.embed(windows), 0, m.depth, keep=[1, m.depth - 1])
        same = m.logits(h[1]).argmax(-1) == m.logits(h[m.depth - 1]).argmax(-1)
    assert accepted == pytest.approx(float(same[:, [7, 14]].float().mean()))
    assert 0.0 < accepted < 1.0


def test_heldout_acceptance_when_sampling_is_the_overlap_of_p_and_q(tiny_decoder):
    """One sampled draft is kept with probability sum_x min(p(x), q(x))."""
    m = peaked(tiny_decoder, seed=4)
    windows = torch.randint(0, V, (4000, 8), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    accepted = heldout_acceptance(m, windows, 2, 1, [8], temperature=1.0, generator=g)
    with torch.no_grad():
        _, h = m.run_layers(m.embed(windows), 0, m.depth, keep=[1, m.depth - 1])
        q, p = (torch.softmax(m.logits(h[i])[:, -1], -1) for i in (1, m.depth - 1))
    overlap = float(torch.minimum(p, q).sum(-1).mean())
    assert accepted == pytest.approx(overlap, abs=0.025)
    assert overlap < 0.9


def test_heldout_acceptance_is_one_when_late_layers_are_identity(tiny_decoder):
    m = tiny_decoder()
    for block in m.layers[3:]:  # zero residual branches: layers 3..5 change nothing
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    windows = torch.randint(0, 40, (16, 12))
    assert heldout_acceptance(m, windows, 3, 4, [4, 8]) == 1.0
    g = torch.Generator().manual_seed(0)
    assert heldout_acceptance(m, windows, 3, 4, [4, 8], temperature=1.0, generator=g) == 1.0
    with pytest.raises(ValueError, match="prefix length"):
        heldout_acceptance(m, windows, 3, 4, [13])


@pytest.mark.parametrize(
    "repeat,exit_layer,num_draft", [(1, 2, 3), (1, 5, 1), (2, 4, 5), (1, 1, 8)]
)
def test_self_speculative_equals_greedy(tiny_decoder, repeat, exit_layer, num_draft):
    m = tiny_decoder(seed=repeat + exit_layer, layer_repeat=repeat)
    prompt = torch.randint(0, 40, (1, 6))
    plain = generate(m, prompt, 30)
    spec, stats = self_speculative_generate(m, prompt, 30, exit_layer, num_draft)
    assert torch.equal(spec, plain)
    assert stats.verify_passes > 0 and 0 <= stats.accepted <= stats.drafted


def test_drafts_are_all_accepted_when_late_layers_are_identity(tiny_decoder):
    m = tiny_decoder()
    for block in m.layers[3:]:  # zero residual branches: layers 3..5 change nothing
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    prompt = torch.randint(0, 40, (1, 4))
    spec, stats = self_speculative_generate(m, prompt, 21, exit_layer=3, num_draft=4)
    assert torch.equal(spec, generate(m, prompt, 21))
    assert stats.acceptance_rate == 1.0 and stats.verify_passes == 4  # 1 + 4 * 5 tokens


@pytest.mark.parametrize("new_tokens", [0, 1, 2, 28])
def test_speculative_decodes_wherever_plain_decoding_fits(tiny_decoder, new_tokens):
    m = tiny_decoder(seed=3)
    prompt = torch.randint(0, 40, (1, 128 - new_tokens))  # prompt + new = block_size 128
    spec, stats = self_speculative_generate(m, prompt, new_tokens, exit_layer=2, num_draft=6)
    plain = generate(m, prompt, new_tokens)
    assert spec.shape == plain.shape == (new_tokens,)
    assert torch.equal(spec, plain)
    assert stats.drafted <= max(new_tokens - 1, 0)  # never a draft past the last wanted token
    with pytest.raises(ValueError, match="exceeds block_size"):
        self_speculative_generate(m, prompt, new_tokens + 1, exit_layer=2)


def test_speculative_rejects_bad_arguments(tiny_decoder):
    m = tiny_decoder()
    with pytest.raises(ValueError, match="exit_layer"):
        self_speculative_generate(m, torch.zeros(1, 3, dtype=torch.long), 5, exit_layer=6)
