"""The per-weight-group energy model and int8 compression targeted by it."""

import pytest
import torch

from fedge.tasks.asr.energy import (
    EnergyCosts,
    WeightGroup,
    energy_metrics,
    place_in_tiers,
    power_ranking,
    profile_groups,
    quantize_weights,
    size_ranking,
    stream_memory,
    total_energy,
)
from fedge.tasks.asr.model import ASRConfig, StreamingASR


def model(**kw) -> StreamingASR:
    torch.manual_seed(0)
    return StreamingASR(ASRConfig(**kw))


def test_each_group_is_invoked_once_per_chunk():
    m = model(chunk=4)  # 4 encoder frames x 40 ms = 160 ms per chunk
    groups = {g.name: g for g in profile_groups(m, seconds=1.6)}
    assert groups["blocks.0.attn.qkv"].invocations_per_s == pytest.approx(1 / 0.16)
    assert groups["out"].invocations_per_s == pytest.approx(1 / 0.16)
    assert groups["blocks.1.ffn.up"].params == 96 * 384 + 384
    # qkv: 25 encoder frames/s, each a 96 -> 288 projection
    assert groups["blocks.0.attn.qkv"].macs_per_s == pytest.approx(25 * 96 * 288)
    assert groups["blocks.0.attn.scores"].params == 0
    # Smaller chunks: lower latency, more weight reads per second.
    small = {g.name: g for g in profile_groups(model(chunk=1), seconds=1.6)}
    assert small["blocks.0.attn.qkv"].invocations_per_s == pytest.approx(25)


def test_tiers_fill_sram_then_spill_to_dram():
    costs = EnergyCosts(sram_bytes=1000)
    groups = [WeightGroup(f"g{i}", params=100, bits=32, invocations_per_s=i + 1, macs_per_s=0)
              for i in range(4)]  # fmt: skip
    place_in_tiers(groups, costs)
    assert [g.tier for g in groups] == ["dram", "dram", "sram", "sram"]  # most-read first
    dram = groups[0].energy_uj_per_s(costs)
    assert dram == pytest.approx(1 * 400 * 160.0 * 1e-6)


def test_folding_cuts_estimated_energy_but_adds_score_macs():
    e = {f: profile_groups(model(fold=f)) for f in (1, 2, 4)}
    totals = [total_energy(e[f]) for f in (1, 2, 4)]
    assert totals[0] > totals[1] > totals[2]
    scores = [sum(g.macs_per_s for g in e[f] if g.name.endswith("scores")) for f in (1, 2, 4)]
    assert scores[1] == pytest.approx(2 * scores[0]) and scores[2] == pytest.approx(4 * scores[0])


def test_int8_targets_the_most_power_hungry_groups_and_saves_energy():
    m = model()
    groups = profile_groups(m)
    top = power_ranking(groups)[:4]
    assert all(next(g for g in groups if g.name == n).tier == "dram" for n in top)
    q = quantize_weights(m, top)
    after = {g.name: g for g in profile_groups(q)}
    assert after[top[0]].bytes == pytest.approx(
        next(g for g in groups if g.name == top[0]).bytes / 4, rel=0.05
    )
    assert total_energy(list(after.values())) < total_energy(groups)
    # Weights now take at most 255 levels per output row and stay close to the originals.
    w, w0 = q.get_submodule(top[0]).weight, m.get_submodule(top[0]).weight
    assert all(len(torch.unique(row)) <= 255 for row in w)
    assert (w - w0).abs().max() <= w0.abs().max() / 127
    assert torch.equal(m.get_submodule(top[0]).weight, w0)  # the original is untouched
    assert size_ranking(groups)[0] != "out"
    four = quantize_weights(m, top[:1], bits=4).get_submodule(top[0]).weight
    assert all(len(torch.unique(row)) <= 15 for row in four)
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(m, top, bits=1)


def test_energy_metrics_and_bad_input():
    out = energy_metrics(model(fold=2))
    assert set(out) == {"energy_uw", "weight_bytes", "energy_dram_share"}
    assert out["energy_uw"] > 0 and 0 <= out["energy_dram_share"] <= 1
    with pytest.raises(ValueError, match="no weight groups"):
        quantize_weights(model(), ["nope"])
    with pytest.raises(TypeError, match="StreamingASR"):
        energy_metrics(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("fold", [1, 4])
def test_stream_memory_counts_weights_and_bounded_cache(fold):
    m = model(fold=fold, chunk=4, left_chunks=4)
    mem = stream_memory(m)
    assert mem["weights"] == 4 * sum(p.numel() for p in m.parameters())
    kv = 3 * 2 * (4 * 4) * 96 * 4  # layers x (k, v) x cached frames x d_model x fp32
    conv = (40 * 2 + 96 * 2) * 4
    assert mem["state"] == kv + conv  # folding leaves the cache size unchanged
    assert 0 < mem["activations"] < mem["weights"]
    assert mem["peak"] == mem["weights"] + mem["state"] + mem["activations"]
