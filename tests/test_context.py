"""Context parsing, the chunked attention mask, the sampler and set_dynamic_context."""
import pytest
import torch

from conftest import tiny_encoder
from modules.context import (
    ContextSampler,
    chunk_attention_mask,
    describe_context,
    parse_context,
    set_dynamic_context,
)
from modules.masker import CausalBlockMasker

PRESETS = {"very_low": [8, 0], "low": [16, 1], "medium": [32, 3], "unlimited": [-1, -1]}


def test_parse_context_forms():
    assert parse_context("low", PRESETS) == (16, 1)
    assert parse_context("32,3") == (32, 3)
    assert parse_context([4, 0]) == (4, 0)
    assert parse_context("unlimited", PRESETS) == (-1, -1)


@pytest.mark.parametrize("bad", ["fast", [4], [-2, 0], [4, -1], [1.5, 0], "a,b"])
def test_parse_context_rejects(bad):
    with pytest.raises(ValueError, match="context|preset"):
        parse_context(bad, PRESETS)


def test_describe_gives_seconds():
    assert describe_context((16, 1), 0.04) == "[16, 1] (left 0.64 s, chunk 0.08 s)"
    assert "all past" in describe_context((-1, 0), 0.04)


@pytest.mark.parametrize("context", [(0, 0), (3, 0), (2, 2), (-1, 1), (5, 3), (-1, -1)])
def test_chunk_mask_matches_definition(context):
    frames = 23
    mask = chunk_attention_mask(frames, context)
    left, right = context
    for t in range(frames):
        for k in range(frames):
            if right == -1:
                expected = True
            else:
                chunk_start = t - t % (right + 1)
                expected = k <= chunk_start + right and (left == -1 or k >= chunk_start - left)
            assert bool(mask[t, k]) == expected, (t, k)


def test_sampler_is_reproducible_and_resumable(tmp_path):
    first = ContextSampler(["very_low", "low", "medium"], presets=PRESETS, seed=7)
    second = ContextSampler(["very_low", "low", "medium"], presets=PRESETS, seed=7)
    draws = [first.sample() for _ in range(50)]
    assert draws == [second.sample() for _ in range(50)]
    assert len(set(draws)) == 3
    first._save(tmp_path / "sampler.ckpt")
    resumed = ContextSampler(["very_low", "low", "medium"], presets=PRESETS, seed=999)
    resumed._load(tmp_path / "sampler.ckpt")
    assert [first.sample() for _ in range(20)] == [resumed.sample() for _ in range(20)]


def test_sampler_follows_probabilities():
    probs = [0.1, 0.2, 0.7]
    sampler = ContextSampler([[8, 0], [16, 1], [32, 3]], probs, seed=0)
    draws = [sampler.sample() for _ in range(20000)]
    for context, p in zip([(8, 0), (16, 1), (32, 3)], probs):
        frequency = draws.count(context) / len(draws)
        assert abs(frequency - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5 + 1e-3
    assert "[8, 0] (left 0.32 s, chunk 0.04 s)" in sampler.pop_counts()


def test_sampler_probability_checks():
    ContextSampler([[i, 0] for i in range(1, 11)], [0.1] * 10)  # sums to 0.9999999999999999
    assert ContextSampler([8, 0]).contexts == [(8, 0)]  # a single pair
    with pytest.raises(ValueError, match="sum to 1"):
        ContextSampler([[8, 0], [16, 1]], [0.5, 0.6])
    with pytest.raises(ValueError, match="2 contexts"):
        ContextSampler([[8, 0], [16, 1]], [1.0])
    with pytest.raises(ValueError, match="preset"):
        ContextSampler(["nonexistent"], presets=PRESETS)


def test_set_dynamic_context_switches_encoder_and_masker_together():
    encoder, masker = tiny_encoder(), CausalBlockMasker(subsampling_factor=4)
    modules = {"encoder": encoder, "masker": masker}
    assert set_dynamic_context(modules, "low", PRESETS) == (16, 1)
    assert encoder.context == masker.context == (16, 1)
    set_dynamic_context(modules, "4,0")
    assert encoder.context == masker.context == (4, 0)
    feats = torch.randn(1, 64, 80)
    assert torch.equal(encoder(feats), encoder(feats, context=(4, 0)))
    with pytest.raises(ValueError, match="no module"):
        set_dynamic_context(torch.nn.Linear(2, 2), "low", PRESETS)


def test_dynchunk_config_maps_to_our_context():
    """SpeechBrain's DynChunkTrainConfig(chunk frames, left chunks) -> [chunk * left, chunk - 1];
    an encoder stream accepts one directly."""
    from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

    from modules.context import context_from_dynchunk

    assert context_from_dynchunk(DynChunkTrainConfig(1, 8)) == (8, 0)
    assert context_from_dynchunk(DynChunkTrainConfig(8, 8)) == (64, 7)
    assert context_from_dynchunk(DynChunkTrainConfig(4, 0)) == (0, 3)
    assert context_from_dynchunk(DynChunkTrainConfig(4, None)) == (-1, 3)
    for bad in (DynChunkTrainConfig(0, 2), DynChunkTrainConfig(4, -1)):
        with pytest.raises(ValueError, match="DynChunkTrainConfig"):
            context_from_dynchunk(bad)
    state = tiny_encoder().make_streaming_context(DynChunkTrainConfig(4, 8))
    assert state.context == (32, 3)
