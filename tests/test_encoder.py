"""Causal Conformer and Transformer: guarantees 1 (no future leak), 2 (bounded attention), 5 (batch
independence)."""
import pytest
import torch

from conftest import tiny_encoder
from modules.context import chunk_attention_mask

KINDS = ["conformer", "transformer"]

CONTEXTS = [(0, 0), (3, 0), (2, 1), (4, 3), (-1, 0), (-1, 2)]


def input_dependence(encoder, feats, context, t):
    """Input frames (indices) that encoder frame t depends on, by gradient."""
    feats = feats.clone().requires_grad_(True)
    out = encoder(feats, context=context)
    weights = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(t))
    (grad,) = torch.autograd.grad((out[0, t] * weights).sum(), feats)
    return grad[0].abs().sum(-1).nonzero().flatten()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s", [4, 8])
@pytest.mark.parametrize("context", CONTEXTS)
def test_no_future_leak_whole_encoder(s, context, kind):
    encoder = tiny_encoder(subsampling_factor=s, num_layers=3, kind=kind)
    feats = torch.randn(1, 30 * s + 3, 80)
    frames = -(-feats.shape[1] // s)
    right = context[1]
    for t in range(frames):
        chunk_end = (t // (right + 1)) * (right + 1) + right
        last_input = min((chunk_end + 1) * s, feats.shape[1]) - 1
        dependence = input_dependence(encoder, feats, context, t)
        assert dependence.max() == last_input, (t, dependence.max(), last_input)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context", [(2, 1), (4, 3)])
def test_no_future_leak_by_perturbation(context, kind):
    encoder, s = tiny_encoder(kind=kind), 4
    feats = torch.randn(1, 120, 80)
    reference = encoder(feats, context=context)
    for t in (0, 5, 13, 22):
        chunk_end = (t // (context[1] + 1)) * (context[1] + 1) + context[1]
        changed = feats.clone()
        changed[:, (chunk_end + 1) * s:] = torch.randn_like(changed[:, (chunk_end + 1) * s:]) * 10
        out = encoder(changed, context=context)
        assert torch.allclose(out[:, : chunk_end + 1], reference[:, : chunk_end + 1], atol=1e-5)
        assert not torch.allclose(out[:, chunk_end + 1:], reference[:, chunk_end + 1:], atol=1e-3)


@pytest.mark.parametrize("banded", [True, False])
@pytest.mark.parametrize("context", [(5, 2), (0, 0), (3, 0), (-1, 1)])
def test_attention_layer_sees_only_its_window(context, banded):
    """Guarantee 2 for one attention layer: nothing outside the window reaches a frame."""
    attention = tiny_encoder(num_layers=1).layers[0].mixer
    x = torch.randn(1, 37, 32, requires_grad=True)
    allowed = chunk_attention_mask(37, context)
    out = attention(x, context, banded=banded)
    for t in range(37):
        (grad,) = torch.autograd.grad((out[0, t] ** 2).sum(), x, retain_graph=True)
        assert torch.equal(grad[0].abs().sum(-1) > 0, allowed[t]), t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context", [(0, 0), (3, 0), (2, 1), (5, 2)])
def test_blocks_see_exactly_their_bounded_past(context, kind):
    """The stack of blocks: encoder frame t depends on exactly the frames its layers' windows
    reach, composed (attention window, then the causal convolution's kernel_size - 1 frames for
    the Conformer); nothing before, nothing after."""
    kernel_size = 5 if kind == "conformer" else 1
    encoder = tiny_encoder(num_layers=3, kernel_size=5, kind=kind).double()
    frames = 40
    attention = chunk_attention_mask(frames, context).double()
    steps = torch.arange(frames)
    convolution = ((steps[None] <= steps[:, None])
                   & (steps[None] > steps[:, None] - kernel_size)).double()
    reach = torch.eye(frames, dtype=torch.float64)
    for _ in encoder.layers:
        reach = (convolution @ attention @ reach).clamp(max=1)
    for t in (0, 7, 20, 39):
        x = torch.randn(1, frames, 32, dtype=torch.float64, requires_grad=True)
        out = x
        for layer in encoder.layers:
            out = layer(out, context)
        # a random projection: a LayerNorm output's plain sum is constant (zero gradient)
        (grad,) = torch.autograd.grad(out[0, t] @ torch.randn(32, dtype=torch.float64), x)
        assert torch.equal(grad[0].abs().sum(-1) > 0, reach[t] > 0), t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context", [(4, 1), (-1, 0), (-1, -1), (0, 0)])
def test_output_does_not_depend_on_rest_of_batch(context, kind):
    encoder = tiny_encoder(kind=kind)
    short, long = torch.randn(1, 90, 80), torch.randn(1, 163, 80)
    batch = torch.zeros(3, 163, 80)
    batch[0, :90], batch[1] = short[0], long[0]
    batch[2, :50] = torch.randn(50, 80) * 5
    lengths = torch.tensor([90, 163, 50]) / 163
    together = encoder(batch, lengths, context)
    alone = encoder(short, context=context)
    assert torch.allclose(together[0, : alone.shape[1]], alone[0], atol=1e-5)
    assert torch.allclose(together[1], encoder(long, context=context)[0], atol=1e-5)
    assert torch.isfinite(together).all()


def test_output_shape_and_lengths():
    for s in (4, 8):
        encoder = tiny_encoder(subsampling_factor=s)
        assert encoder(torch.randn(2, 101, 80)).shape == (2, -(-101 // s), 32)
    with pytest.raises(ValueError, match="context"):
        tiny_encoder()(torch.randn(1, 40, 80), context=(3, -1))


def test_no_batchnorm_anywhere():
    encoder = tiny_encoder()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
