"""Streaming transformer: streaming equals the full pass, folding shapes and sizes, CTC, CER."""

import pytest
import torch

from fedge.tasks.asr.model import (
    SUBSAMPLING,
    ASRConfig,
    StreamingASR,
    chunk_mask,
    ctc_greedy,
    edit_distance,
    error_rate,
    fold_tokens,
    subsampled_length,
    unfold_tokens,
)


def model(**kw) -> StreamingASR:
    torch.manual_seed(0)
    return StreamingASR(ASRConfig(**kw)).eval()


def feats(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 40, generator=g) * 3 - 8


@pytest.mark.parametrize("fold,fold_ffn", [(1, False), (2, False), (4, False), (2, True)])
@pytest.mark.parametrize("left_chunks", [0, 2])
def test_streaming_emits_exactly_what_the_full_pass_emits(fold, fold_ffn, left_chunks):
    m = model(fold=fold, fold_ffn=fold_ffn, left_chunks=left_chunks, chunk=3)
    x = feats(2, 101)  # not a whole number of chunks: the last one is padded and masked
    with torch.no_grad():
        full = m(x)
    streamed = m.stream(x)
    assert streamed.shape == full.shape == (2, subsampled_length(torch.tensor(101)), 29)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-5)
    assert ctc_greedy(streamed) == ctc_greedy(full)


def test_padded_batch_matches_each_utterance_streamed_alone():
    m = model(fold=2)
    x = feats(3, 96)
    lengths = torch.tensor([96, 70, 33])
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0.0
    with torch.no_grad():
        full = m(x, lengths)
    enc = subsampled_length(lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = m.stream(x[i : i + 1, :n])
        torch.testing.assert_close(alone[0], full[i, : enc[i]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fold", [1, 2])
@pytest.mark.parametrize("left_chunks", [0, 2])
def test_uneven_batch_streamed_with_padded_masked_last_chunks_equals_the_full_pass(
    fold, left_chunks
):
    m = model(fold=fold, left_chunks=left_chunks, chunk=3)
    lengths = torch.tensor([101, 58, 7, 36])  # none but the 36 a whole number of 12-frame chunks
    x = feats(4, 101)
    x[torch.arange(101)[None] >= lengths[:, None]] = 1e3  # loud padding: it must not leak in
    with torch.no_grad():
        full = m(x, lengths)
    streamed = m.stream(x, lengths)
    assert streamed.shape == full.shape == (4, 26, 29)
    enc = subsampled_length(lengths)
    for i in range(4):
        assert torch.isfinite(streamed[i]).all()
        torch.testing.assert_close(streamed[i, : enc[i]], full[i, : enc[i]], atol=1e-5, rtol=1e-5)


def test_stream_step_refuses_a_step_that_is_not_whole_chunks():
    m = model(chunk=3)
    with pytest.raises(ValueError, match="whole chunks of 12 feature frames .chunk=3"):
        m.stream_step(feats(1, 10))
    _, state = m.stream_step(feats(1, 24))  # two whole chunks are one step
    with pytest.raises(ValueError, match="got 13"):
        m.stream_step(feats(1, 13), state)


def test_stream_step_refuses_frames_after_a_row_ended():
    m = model(chunk=2)
    _, state = m.stream_step(feats(2, 8), lengths=torch.tensor([8, 5]))
    m.stream_step(feats(2, 8), state, torch.tensor([8, 0]))
    with pytest.raises(ValueError, match="stream has ended"):
        m.stream_step(feats(2, 8), state, torch.tensor([8, 1]))
    with pytest.raises(ValueError, match="valid frames per row in 0..8"):
        m.stream_step(feats(2, 8), state, torch.tensor([9, 0]))


def test_no_frame_sees_a_later_chunk_and_left_context_is_bounded():
    m = model(n_layer=1, chunk=2, left_chunks=1)
    x = feats(1, 64)
    step = SUBSAMPLING * 2  # feature frames per chunk
    with torch.no_grad():
        base = m(x)
        later = x.clone()
        later[:, 5 * step :] += 5.0  # change chunk 5 onwards
        assert torch.equal(m(later)[:, :10], base[:, :10])
        assert not torch.allclose(m(later)[:, 10:], base[:, 10:])
        early = x.clone()
        early[:, :step] += 5.0  # chunk 0 is out of reach of chunk 3 (1 left chunk, 1 layer)
        torch.testing.assert_close(m(early)[:, 6:], base[:, 6:], atol=1e-6, rtol=0)
        assert not torch.allclose(m(early)[:, :2], base[:, :2])


def test_stream_cache_stays_bounded():
    m = model(chunk=2, left_chunks=3, fold=2)
    state, x = None, feats(1, 200)
    for start in range(0, 200, 8):
        _, state = m.stream_step(x[:, start : start + 8], state)
    k, _ = state.kv[0]
    assert k.shape[2] == 3 * 2 * 2  # left_chunks * chunk frames, two sub-tokens each


def test_fold_tokens_round_trip_and_order():
    x = torch.arange(2 * 3 * 8.0).view(2, 3, 8)
    f = fold_tokens(x, 4)
    assert f.shape == (2, 12, 2)
    assert f[0, 4].tolist() == x[0, 1, :2].tolist()  # token 1's first sub-token
    assert torch.equal(unfold_tokens(f, 4), x)


def encoder_layer_params(d: int, fold: int, fold_ffn: bool, mult: int = 4) -> int:
    w = d // fold
    attn = w * 3 * w + 3 * w + w * w + w
    f = w if fold_ffn else d
    ffn = f * mult * f + mult * f + mult * f * f + f
    return attn + ffn + 4 * d  # two LayerNorms


@pytest.mark.parametrize("fold_ffn", [False, True])
@pytest.mark.parametrize("fold", [1, 2, 4])
def test_fold_shrinks_the_attention_projections_by_fold_squared(fold, fold_ffn):
    cfg = ASRConfig(fold=fold, fold_ffn=fold_ffn, d_model=96, n_head=4, n_layer=3)
    m = StreamingASR(cfg)
    block = m.blocks[0]
    w = 96 // fold
    assert block.attn.qkv.weight.shape == (3 * w, w)
    assert block.attn.proj.weight.shape == (w, w)
    # The paper folds the attention; the FFN is folded only when asked.
    f = w if fold_ffn else 96
    assert block.ffn.up.weight.shape == (4 * f, f)
    assert block.attn.n_head == 4 // fold
    assert sum(p.numel() for p in block.parameters()) == encoder_layer_params(96, fold, fold_ffn)
    frontend = (40 * 96 * 3 + 96) + (96 * 96 * 3 + 96)
    head = 2 * 96 + 96 * 29 + 29
    total = sum(p.numel() for p in m.parameters())
    assert total == frontend + 3 * encoder_layer_params(96, fold, fold_ffn) + head


def test_bad_fold_is_a_clear_error():
    with pytest.raises(ValueError, match="fold=3 must divide"):
        ASRConfig(fold=3)


def test_pooled_head_gives_one_prediction_per_utterance():
    m = model(head="pool", n_out=10)
    assert m(feats(4, 98)).shape == (4, 10)


def test_chunk_mask():
    t = torch.arange(6)
    m = chunk_mask(t, t, chunk=2, left_chunks=1)
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[5].tolist() == [False, False, True, True, True, True]


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    ids = torch.tensor([[0, 3, 3, 0, 3, 4, 4, 0, 0, 5]])
    logits = torch.nn.functional.one_hot(ids, 6).float()
    assert ctc_greedy(logits) == [[3, 3, 4, 5]]
    assert ctc_greedy(logits, torch.tensor([5])) == [[3, 3]]


def test_edit_distance_cer_and_wer():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert error_rate(["go left"], ["go lef"]) == pytest.approx(1 / 7)
    assert error_rate(["go left", "stop"], ["go right", "stop"], unit="word") == pytest.approx(
        1 / 3
    )
