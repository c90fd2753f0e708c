"""Contexts switched between chunks of a stream: the stream equals the offline pass under the
piecewise context it ran (design.md, guarantee 3, extended to switching)."""
import random

import pytest
import torch

from conftest import tiny_encoder
from modules.context import PiecewiseContext

TRAINED = [(0, 0), (6, 0), (3, 1), (8, 1), (5, 3), (12, 3)]  # the contexts a stream may take


def make_encoder(kind: str, layer_left_contexts=None):
    from modules.conmamba import ConMambaEncoder

    if kind == "conmamba":
        return ConMambaEncoder(d_model=32, num_encoder_layers=2, d_ffn=64, kernel_size=5,
                               subsampling_conv_channels=8, dropout=0.0, d_state=4).eval().double()
    encoder = tiny_encoder(num_layers=3, kind=kind).double()
    if layer_left_contexts is not None:
        encoder.layer_left_contexts = layer_left_contexts
    return encoder


def random_schedules(rng: random.Random, streams: int, chunks: int):
    """Per stream, a context per chunk; the streams of a batch switch their left contexts
    independently and change chunk size together."""
    rights = [rng.choice(sorted({r for _, r in TRAINED})) for _ in range(chunks)]
    return [[rng.choice([c for c in TRAINED if c[1] == right]) for right in rights]
            for _ in range(streams)]


def stream_with_schedules(encoder, feats, schedules, max_left: int, lengths=None):
    """Streams ``feats`` (B, T, 80) switching every stream's context before each chunk."""
    state = encoder.make_streaming_context(schedules[0][0], max_left=max_left)
    outputs, start, k = [], 0, 0
    while start < feats.shape[1]:
        rows = [row[min(k, len(row) - 1)] for row in schedules]
        encoder.switch_context(state, rows)
        size = encoder.chunk_frames(state)
        chunk_lengths = None if lengths is None else (lengths - start).clamp(0, size)
        outputs.append(encoder.forward_streaming(feats[:, start:start + size], state,
                                                 chunk_lengths))
        start, k = start + size, k + 1
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("kind", ["conformer", "transformer", "conmamba"])
@pytest.mark.parametrize("seed", range(3))
def test_switched_stream_equals_piecewise_offline_reference(kind, seed):
    rng = random.Random(seed)
    encoder = make_encoder(kind)
    s = encoder.subsampling_factor
    schedules = random_schedules(rng, streams=3, chunks=40)
    feats = torch.randn(3, 37 * s + 2, 80, dtype=torch.float64)
    streamed, state = stream_with_schedules(encoder, feats, schedules, max_left=12)
    reference = encoder(feats, context=PiecewiseContext(schedules))
    assert streamed.shape == reference.shape
    assert (streamed - reference).abs().max() < 1e-6
    for row, schedule in enumerate(schedules):  # each stream alone, its own schedule
        alone = encoder(feats[row:row + 1], context=PiecewiseContext([schedule]))
        assert (streamed[row:row + 1] - alone).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["conformer", "conmamba"])
def test_switching_matters(kind):
    """The reference is not the fixed-context pass: a schedule changes the output."""
    encoder = make_encoder(kind)
    feats = torch.randn(1, 160, 80, dtype=torch.float64)
    schedule = [(12, 1)] * 10 + [(0, 1)] * 30
    switched = encoder(feats, context=PiecewiseContext([schedule]))
    assert (switched[:, :20] - encoder(feats, context=(12, 1))[:, :20]).abs().max() < 1e-9
    assert (switched - encoder(feats, context=(12, 1))).abs().max() > 1e-3


def test_switched_batch_with_streams_of_different_lengths():
    encoder = make_encoder("conformer")
    schedules = random_schedules(random.Random(5), streams=3, chunks=50)
    lengths = torch.tensor([161, 66, 9])
    feats = torch.randn(3, 161, 80, dtype=torch.float64)
    streamed, _ = stream_with_schedules(encoder, feats, schedules, 12, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = encoder(feats[row:row + 1, :length], context=PiecewiseContext([schedules[row]]))
        assert (streamed[row, :alone.shape[1]] - alone[0]).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["conformer", "conmamba"])
def test_caches_never_exceed_the_maximum_left_context(kind):
    encoder = make_encoder(kind)
    max_left = 8
    state = encoder.make_streaming_context((0, 0), max_left=max_left)
    rng = random.Random(1)
    for _ in range(60):
        encoder.switch_context(state, rng.choice([c for c in TRAINED if c[0] <= max_left]))
        encoder.forward_streaming(torch.randn(1, encoder.chunk_frames(state), 80,
                                              dtype=torch.float64), state)
        for layer in state.layers:
            for name in ("k", "v", "window"):
                if layer.mixer.get(name) is not None:
                    assert layer.mixer[name].shape[-2 if name != "window" else 1] <= max_left


def test_per_layer_caps_apply_to_switched_streams():
    encoder = make_encoder("conformer", layer_left_contexts=[2, 6, 12])
    schedules = random_schedules(random.Random(2), streams=2, chunks=40)
    feats = torch.randn(2, 130, 80, dtype=torch.float64)
    streamed, _ = stream_with_schedules(encoder, feats, schedules, max_left=12)
    assert (streamed - encoder(feats, context=PiecewiseContext(schedules))).abs().max() < 1e-6


def test_bad_switches_are_refused():
    encoder = make_encoder("conformer")
    fixed = encoder.make_streaming_context((8, 1))
    with pytest.raises(ValueError, match="max_left"):
        encoder.switch_context(fixed, (4, 1))
    state = encoder.make_streaming_context((8, 1), max_left=8)
    with pytest.raises(ValueError, match="max_left \\(8 frames"):
        encoder.switch_context(state, (12, 1))
    with pytest.raises(ValueError, match="same chunk size|equal chunks"):
        encoder.switch_context(state, [(8, 1), (8, 3)])
    with pytest.raises(ValueError, match="left = -1"):
        make_encoder("conmamba").make_streaming_context((-1, 1), max_left=8)
    with pytest.raises(ValueError, match="max_left"):
        encoder.make_streaming_context((16, 1), max_left=8)
    with pytest.raises(ValueError, match="offline"):
        PiecewiseContext([[(-1, -1)]])
