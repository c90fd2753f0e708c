"""Activation checkpointing: the same outputs and gradients (dropout included), only in training
with gradients, never in streaming; every encoder yaml exposes the option."""
import re

import pytest
import torch
import yaml

import modules.encoder
from conftest import ROOT
from modules.conformer import CausalConformerEncoder
from modules.conmamba import ConMambaEncoder
from modules.transformer import CausalTransformerEncoder

ENCODERS = {"conformer": CausalConformerEncoder, "transformer": CausalTransformerEncoder,
            "conmamba": ConMambaEncoder}
LAYERS = 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread adds only synchronization (spinning, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, **kwargs) -> torch.nn.Module:
    """A tiny encoder with dropout, in train mode."""
    sizes = dict(d_model=16, num_encoder_layers=LAYERS, d_ffn=32, subsampling_conv_channels=4,
                 dropout=0.2, **kwargs)
    if kind != "conmamba":
        sizes["nhead"] = 2
    return ENCODERS[kind](**sizes).train()


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list:
    """Counts the encoder's calls of ``torch.utils.checkpoint.checkpoint`` (still run)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)
    monkeypatch.setattr(modules.encoder, "checkpoint", counting)
    return calls


def step(encoder, feats, lengths, context, seed: int = 1, **options):
    """Output, input gradient and parameter gradients of one seeded training step."""
    torch.manual_seed(seed)
    feats = feats.clone().requires_grad_(True)
    out = encoder(feats, lengths, context=context, **options)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    return out.detach(), feats.grad, grads


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("context, padded", [((8, 0), True), ((-1, -1), True), ((-1, -1), False)])
def test_same_outputs_and_gradients(kind, context, padded, checkpoint_calls):
    encoder = tiny(kind)
    feats = torch.randn(2, 61, 80)
    lengths = torch.tensor([1.0, 0.6]) if padded else None
    plain = step(encoder, feats, lengths, context)
    encoder.activation_checkpointing = True
    checkpointed = step(encoder, feats, lengths, context)
    assert len(checkpoint_calls) == LAYERS
    assert checkpoint_calls[0]["use_reentrant"] is False
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    assert plain[2].keys() == checkpointed[2].keys()
    for name, grad in plain[2].items():
        assert torch.equal(grad, checkpointed[2][name]), name
    # dropout is live: another seed gives other masks, so the equality above is not vacuous
    assert not torch.equal(step(encoder, feats, lengths, context, seed=2)[0], plain[0])


def test_block_options_reach_the_mixer(checkpoint_calls):
    """``**options`` (``banded=False``) pass through the checkpoint to every block's mixer."""
    encoder = tiny("conformer", activation_checkpointing=True)
    seen = []
    for layer in encoder.layers:
        layer.mixer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("banded")), with_kwargs=True)
    feats = torch.randn(2, 61, 80)
    lengths = torch.tensor([1.0, 0.7])
    checkpointed = step(encoder, feats, lengths, (8, 0), banded=False)
    assert len(checkpoint_calls) == LAYERS
    assert seen and set(seen) == {False}  # forward and the backward pass's recomputation
    encoder.activation_checkpointing = False
    plain = step(encoder, feats, lengths, (8, 0), banded=False)
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_nothing_checkpointed_without_a_graph(kind, checkpoint_calls):
    encoder = tiny(kind, activation_checkpointing=True)
    feats = torch.randn(2, 40, 80)
    with torch.no_grad():
        encoder(feats)  # training, no gradients
    encoder.eval()(feats)  # gradients, inference
    assert checkpoint_calls == []
    encoder.train()(feats)
    assert len(checkpoint_calls) == LAYERS


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_streaming_never_checkpoints_and_equals_offline(kind, checkpoint_calls):
    encoder = tiny(kind, activation_checkpointing=True)
    feats = torch.randn(2, 70, 80)
    lengths = torch.tensor([1.0, 0.7])
    encoder.encode_in_chunks(feats, lengths, (8, 1))  # training mode, gradients enabled
    assert checkpoint_calls == []
    encoder.eval()
    offline = encoder(feats, lengths, context=(8, 1))
    streamed = encoder.encode_in_chunks(feats, lengths, (8, 1))
    frames = -(-torch.round(lengths * feats.shape[1]).long() // encoder.subsampling_factor)
    for row, n in enumerate(frames.tolist()):
        torch.testing.assert_close(streamed[row, :n], offline[row, :n], atol=1e-5, rtol=1e-5)


def test_default_off():
    assert all(not tiny(kind).activation_checkpointing for kind in ENCODERS)


YAMLS = [path for folder in ("SSL", "CTC", "S2S")
         for path in sorted((ROOT / "hparams").glob(f"{folder}/*.yaml"))]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yamls_pass_the_option_to_the_encoder(path):
    """``activation_checkpointing: False`` in every encoder yaml, given to the encoder."""
    class Loader(yaml.SafeLoader):
        """Tags kept as text (``!new:...`` mappings as dicts), nothing built."""
    Loader.add_multi_constructor("!", lambda loader, tag, node: (
        {"!": tag, **loader.construct_mapping(node)} if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)))
    hparams = yaml.load(path.read_text(), Loader)
    assert hparams["activation_checkpointing"] is False
    assert re.match(r"new:modules\.\w+\.\w+Encoder$", hparams["encoder"]["!"])
    assert hparams["encoder"]["activation_checkpointing"] == "<activation_checkpointing>"
