"""Guarantee 3 (streaming == offline), bounded caches, banded attention, per-layer contexts."""
import pytest
import torch

from conftest import tiny_encoder
from modules.features import FbankStream, StreamingFbank
from modules.masker import CausalBlockMasker


def stream(encoder, feats, context):
    """Concatenated outputs of feeding ``feats`` chunk by chunk."""
    state = encoder.make_streaming_context(context)
    size = encoder.chunk_frames(state)
    return torch.cat([encoder.forward_streaming(feats[:, i:i + size], state)
                      for i in range(0, feats.shape[1], size)], dim=1)


@pytest.mark.parametrize("kind", ["conformer", "transformer"])
@pytest.mark.parametrize("s", [4, 8])
@pytest.mark.parametrize("context", [(0, 0), (6, 0), (1, 1), (5, 2), (8, 3), (2, 7)])
def test_streaming_equals_offline_float64(s, context, kind):
    encoder = tiny_encoder(subsampling_factor=s, num_layers=3, kind=kind).double()
    feats = torch.randn(2, 41 * s + 3, 80, dtype=torch.float64)  # last chunk is partial
    offline = encoder(feats, context=context)
    streamed = stream(encoder, feats, context)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() < 1e-6


def test_streaming_equals_offline_float32():
    encoder = tiny_encoder(num_layers=4)
    feats = torch.randn(1, 403, 80)
    for context in [(16, 0), (8, 3)]:
        assert (stream(encoder, feats, context) - encoder(feats, context=context)).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["conformer", "transformer", "conmamba"])
@pytest.mark.parametrize("context", [(0, 0), (6, 0), (5, 2), (2, 7)])
def test_streams_of_different_lengths_side_by_side(name, context):
    """A padded batch streamed at once (evaluation) equals each utterance's offline output."""
    from modules.conmamba import ConMambaEncoder

    encoder = tiny_encoder(num_layers=3, kind=name) if name != "conmamba" else ConMambaEncoder(
        d_model=32, num_encoder_layers=2, d_ffn=64, kernel_size=5, subsampling_conv_channels=8,
        dropout=0.0, d_state=4).eval()
    encoder = encoder.double()
    lengths = [161, 66, 3]  # last chunks partly padding, partial groups of s, one chunk only
    feats = torch.randn(3, 161, 80, dtype=torch.float64)
    streamed = encoder.encode_in_chunks(feats, torch.tensor(lengths) / 161, context)
    for row, length in enumerate(lengths):
        alone = encoder(feats[row:row + 1, :length], context=context)[0]
        assert (streamed[row, :alone.shape[0]] - alone).abs().max() < 1e-6, (row, length)
    assert torch.isfinite(streamed).all()


def test_audio_front_end_streams_exactly():
    """Raw audio in pieces of random size -> fbank -> normalization -> encoder chunks."""
    fbank, encoder = StreamingFbank(), tiny_encoder().double()
    audio = torch.randn(1, 3 * 16000, dtype=torch.float64) * 0.1
    mean, std = torch.randn(80, dtype=torch.float64), torch.rand(80, dtype=torch.float64) + 0.5
    context = (8, 1)
    offline = encoder((fbank(audio) - mean) / std, context=context)

    front_end, state = FbankStream(fbank), encoder.make_streaming_context(context)
    size, pending, outputs, start = encoder.chunk_frames(state), [], [], 0
    pieces = torch.Generator().manual_seed(0)
    while start < audio.shape[1]:
        stop = start + int(torch.randint(1, 3000, (1,), generator=pieces))
        pending.append((front_end.push(audio[:, start:stop]) - mean) / std)
        start = stop
        frames = torch.cat(pending, dim=1)
        while frames.shape[1] >= size:
            outputs.append(encoder.forward_streaming(frames[:, :size], state))
            frames = frames[:, size:]
        pending = [frames]
    if frames.shape[1]:
        outputs.append(encoder.forward_streaming(frames, state))
    assert (torch.cat(outputs, dim=1) - offline).abs().max() < 1e-6


def test_caches_stay_bounded_over_a_long_stream():
    encoder = tiny_encoder(num_layers=2, kernel_size=5)
    context = (12, 1)
    state = encoder.make_streaming_context(context)
    size = encoder.chunk_frames(state)
    for step in range(300):  # 300 chunks = 24 s of features
        encoder.forward_streaming(torch.randn(1, size, 80), state)
        for layer in state.layers:
            assert layer.mixer["k"].shape[2] <= 12 and layer.mixer["v"].shape[2] <= 12
            assert layer.conv.shape[2] == 4
        assert all(cache.shape[2] == 1 for cache in state.subsampling)
    assert state.layers[0].mixer["k"].shape[2] == 12
    assert state.layers[0].mixer["position"] == 600


def test_unbounded_or_offline_contexts_are_refused():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="bounded cache"):
        encoder.make_streaming_context((-1, 0))
    with pytest.raises(ValueError, match="offline"):
        encoder.make_streaming_context((-1, -1))
    capped = tiny_encoder(num_layers=2)
    capped.layer_left_contexts = [4, 8]
    assert capped.make_streaming_context((-1, 0)).layer_contexts == [(4, 0), (8, 0)]


def test_chunk_size_and_ended_stream_errors():
    encoder = tiny_encoder()
    state = encoder.make_streaming_context((4, 1))
    with pytest.raises(ValueError, match="8 feature frames"):
        encoder.forward_streaming(torch.randn(1, 9, 80), state)
    encoder.forward_streaming(torch.randn(1, 5, 80), state)  # short: the last chunk
    with pytest.raises(ValueError, match="ended"):
        encoder.forward_streaming(torch.randn(1, 8, 80), state)


@pytest.mark.parametrize("context", [(0, 0), (3, 0), (7, 2), (16, 3), (40, 0)])
def test_banded_attention_equals_masked_reference_with_padding(context):
    encoder = tiny_encoder(num_layers=2).double()
    feats = torch.randn(3, 197, 80, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1.0, 0.6, 0.1], dtype=torch.float64)
    banded = encoder(feats, lengths, context)
    dense = encoder(feats, lengths, context, banded=False)
    valid = torch.arange(banded.shape[1])[None] < torch.tensor([50, 30, 5])[:, None]
    assert (banded - dense)[valid].abs().max() < 1e-10
    assert torch.isfinite(banded).all()
    weights = torch.randn_like(banded) * valid[..., None]
    (grad_banded,) = torch.autograd.grad((banded * weights).sum(), feats)
    (grad_dense,) = torch.autograd.grad((dense * weights).sum(), feats)
    assert (grad_banded - grad_dense).abs().max() < 1e-10


def test_per_layer_left_contexts():
    encoder = tiny_encoder(num_layers=3).double()
    encoder.layer_left_contexts = [2, 6, 12]
    assert encoder.layer_contexts((8, 1)) == [(2, 1), (6, 1), (8, 1)]
    assert encoder.layer_contexts((-1, 1)) == [(2, 1), (6, 1), (12, 1)]
    assert encoder.layer_contexts((-1, -1)) == [(-1, -1)] * 3
    assert encoder.narrowest_context((8, 1)) == (2, 1)
    feats = torch.randn(1, 160, 80, dtype=torch.float64)
    offline = encoder(feats, context=(-1, 1))
    assert (stream(encoder, feats, (-1, 1)) - offline).abs().max() < 1e-6
    assert (encoder(feats, context=(-1, 1), banded=False) - offline).abs().max() < 1e-10
    # The first layer's window is the narrowest: changing it changes the output.
    encoder.layer_left_contexts = [6, 6, 12]
    assert (encoder(feats, context=(-1, 1)) - offline).abs().max() > 1e-6
    with pytest.raises(ValueError, match="layer_left_contexts"):
        tiny_encoder(num_layers=2).__class__(num_encoder_layers=2, layer_left_contexts=[1])


def test_masker_follows_narrowest_layer():
    """With caps, a masked frame keeps visible input inside the first layer's window."""
    encoder = tiny_encoder(num_layers=3)
    encoder.layer_left_contexts = [1, 6, 12]
    masker = CausalBlockMasker(subsampling_factor=4, mask_prob=0.9, block_size=24)
    lengths = torch.tensor([400, 240])
    mask = masker.draw(torch.randn(2, 400, 80), lengths, encoder.narrowest_context((16, 0)))
    frame_mask = mask[:, ::4]
    for b in range(2):
        for t in frame_mask[b].nonzero().flatten().tolist():
            assert (t > 0 and not frame_mask[b, t - 1]) or not frame_mask[b, t]
