"""What Apple's MPS backend needs, on the CPU: no float64 anywhere in training or streaming (MPS has
none), exact streaming with float32 rotary angles, and the CTC loss computed on the CPU where
the device has no CTC kernel. (Spawn-started DataLoader workers: test_distributed.py.)"""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import tiny_encoder
from modules import attention
from modules import ctc as ctc_module
from modules.conmamba import ConMambaEncoder
from modules.features import StreamingFbank


class Float64Ops(TorchDispatchMode):
    """Records every op that produces a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64
               for t in tree_flatten(out)[0]):
            self.ops.add(str(func))
        return out


@pytest.fixture
def like_mps(monkeypatch):
    """The CPU takes the code paths of a device without float64."""
    monkeypatch.setattr(attention, "FLOAT64_DEVICE_TYPES", ())


def encoders():
    conmamba = ConMambaEncoder(d_model=32, num_encoder_layers=2, d_ffn=64, kernel_size=5,
                               subsampling_conv_channels=8, dropout=0.0, d_state=4).eval()
    return {"conformer": tiny_encoder(), "conmamba": conmamba}


@pytest.mark.parametrize("name", ["conformer", "conmamba"])
def test_no_float64_in_training_and_streaming(like_mps, name):
    encoder = encoders()[name]  # ConMamba: the chunked scan and window correction, as on MPS
    feats = StreamingFbank()(torch.randn(2, 16000))
    spy = Float64Ops()
    with spy:
        for context in [(8, 0), (16, 1), (-1, -1)]:
            encoder(feats, torch.tensor([1.0, 0.7]), context=context).square().sum().backward()
        state = encoder.make_streaming_context((8, 1))
        encoder.forward_streaming(feats[:, :8], state)
    assert not spy.ops, spy.ops


def test_float32_rotary_angles_still_stream_exactly(like_mps):
    encoder = tiny_encoder()
    feats = torch.randn(1, 4000, 80)  # 1000 encoder frames: positions far from zero
    offline = encoder(feats, context=(16, 1))
    assert (encoder.encode_in_chunks(feats, context=(16, 1)) - offline).abs().max() < 1e-4


def test_ctc_loss_falls_back_to_cpu_once(monkeypatch, caplog):
    original, calls = ctc_module.sb_ctc_loss, []

    def device_without_ctc(log_probs, *args, **kwargs):
        calls.append(log_probs.device.type)
        if len(calls) == 1:  # the attempt on the device
            raise NotImplementedError("The operator 'aten::_ctc_loss' is not implemented for MPS")
        return original(log_probs, *args, **kwargs)

    monkeypatch.setattr(ctc_module, "sb_ctc_loss", device_without_ctc)
    monkeypatch.setattr(ctc_module, "_devices_without_ctc", set())
    log_probs = torch.randn(2, 30, 8).log_softmax(-1).requires_grad_()
    targets, lengths = torch.randint(1, 8, (2, 6)), torch.ones(2)
    expected = original(log_probs, targets, lengths, lengths, blank_index=0)
    with caplog.at_level(logging.WARNING):
        loss = ctc_module.ctc_loss(log_probs, targets, lengths, lengths)
        again = ctc_module.ctc_loss(log_probs, targets, lengths, lengths)
    assert torch.equal(loss, expected) and torch.equal(again, expected)
    assert len(calls) == 3  # one failed attempt on the device, then straight to the CPU
    assert sum("not implemented on cpu" in r.message for r in caplog.records) == 1
    loss.backward()
    assert torch.isfinite(log_probs.grad).all() and log_probs.grad.abs().sum() > 0
