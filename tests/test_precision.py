"""bf16 rules, checked with CPU autocast where CUDA is absent: quantizer targets and features stay
float32, Mamba's fused path hands mamba-ssm / causal-conv1d the dtypes their kernels accept (CPU
stand-ins with the kernels' checks, ``fake_mamba_kernels``) with our scans' numbers, and bf16
training steps run end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

import fake_mamba_kernels as fake
from modules import mamba as mamba_module
from modules.conmamba import ConMambaEncoder
from modules.features import StreamingFbank
from modules.mamba import Mamba
from modules.quantizer import RandomProjectionQuantizer
from test_recipe import CONMAMBA_TINY, TINY, train

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def test_autocast_really_lowers_matmuls_here():
    """Otherwise the tests below could not fail."""
    with torch.autocast(**BF16):
        assert (torch.randn(4, 8) @ torch.randn(8, 2)).dtype == torch.bfloat16


def test_quantizer_targets_do_not_change_under_autocast():
    quantizer = RandomProjectionQuantizer(n_mels=80, subsampling_factor=4, num_classes=256,
                                          num_books=2)
    feats = torch.randn(4, 800, 80)
    expected = quantizer(feats)
    with torch.autocast(**BF16):
        assert torch.equal(quantizer(feats), expected)
        lowered = (feats.reshape(-1, 320) @ quantizer.projection[0]).float()
    codes = (F.normalize(lowered, dim=-1) @ quantizer.codebooks[0].T).argmax(-1)
    assert (codes != expected[..., 0].flatten()).any()  # what bf16 targets would have been


def test_features_are_float32_under_autocast():
    fbank = StreamingFbank()
    audio = torch.randn(2, 16000)
    with torch.autocast(**BF16):
        feats = fbank(audio)
    assert feats.dtype == torch.float32 and torch.equal(feats, fbank(audio))


@pytest.fixture
def fused(monkeypatch):
    """Mamba's fused path on CPU, through the stand-in kernels."""
    monkeypatch.setattr(mamba_module, "selective_scan_fn", fake.selective_scan_fn)
    monkeypatch.setattr(mamba_module, "causal_conv1d_fn", fake.causal_conv1d_fn)
    monkeypatch.setattr(mamba_module, "FUSED_DEVICE_TYPES", ("cpu",))
    fake.calls.update(scan=0, conv=0)


def fused_and_chunked(d_model=16):
    fused_layer = Mamba(d_model=d_model, d_state=4, scan_backend="auto")
    chunked = Mamba(d_model=d_model, d_state=4, scan_backend="chunked")
    chunked.load_state_dict(fused_layer.state_dict())
    return fused_layer, chunked


# Full scan; windowed scans of chunks of 1, 2 and 3 frames; a window too long for the fused
# kernel (factor 41 > FUSED_MAX_WINDOW_FACTOR): the chunked scan with the window correction.
@pytest.mark.parametrize("context", [(-1, -1), (8, 0), (6, 1), (4, 2), (40, 0)])
def test_fused_path_equals_our_scan_float32(fused, context):
    layer, reference = fused_and_chunked()
    x = torch.randn(2, 45, 16, requires_grad=True)
    y, y_ref = layer(x, context), reference(x, context)
    assert (y - y_ref).abs().max() < 1e-5
    grads = [torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
             for out, net in ((y, layer), (y_ref, reference))]
    for grad, grad_ref in zip(*grads):
        assert (grad - grad_ref).abs().max() < 1e-4 * (1 + grad_ref.abs().max())
    assert fake.calls["conv"] > 0 and (fake.calls["scan"] > 0) == (context != (40, 0))


@pytest.mark.parametrize("context", [(-1, -1), (8, 0), (6, 1)])
def test_fused_path_under_bf16_autocast(fused, context):
    layer, reference = fused_and_chunked()
    x = torch.randn(2, 45, 16)
    expected = reference(x, context)
    source = x.clone().requires_grad_()
    with torch.autocast(**BF16):
        y = layer(source, context)  # the stand-in refuses mismatched dtypes, as the kernel does
    y.float().square().sum().backward()
    assert fake.calls["scan"] > 0 and torch.isfinite(source.grad).all()
    assert (y.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_the_stand_in_refuses_what_the_kernel_refuses():
    u = torch.randn(1, 4, 6, dtype=torch.bfloat16)
    B = C = torch.randn(1, 2, 6, dtype=torch.bfloat16)
    A = -torch.rand(4, 2)
    with pytest.raises(RuntimeError, match="delta must have u's dtype"):  # softplus output, fp32
        fake.selective_scan_fn(u, torch.rand(1, 4, 6), A, B, C)
    with pytest.raises(RuntimeError, match="delta_bias must be float32"):
        fake.selective_scan_fn(u, u, A, B, C, delta_bias=torch.zeros(4, dtype=torch.bfloat16))


def test_fused_conmamba_streams_exactly(fused):
    encoder = ConMambaEncoder(d_model=32, num_encoder_layers=2, d_ffn=64, kernel_size=5,
                              subsampling_conv_channels=8, dropout=0.0, d_state=4).eval()
    feats = torch.randn(2, 96, 80)
    for context in [(6, 1), (-1, 2)]:
        offline = encoder(feats, context=context)
        assert (encoder.encode_in_chunks(feats, context=context) - offline).abs().max() < 1e-4


@pytest.mark.parametrize("hparams, tiny", [("conformer.yaml", TINY), ("conmamba.yaml", CONMAMBA_TINY)])
def test_bf16_ssl_steps_run(tmp_path, hparams, tiny):
    run = train(tmp_path, "--debug", "--precision", "bf16", hparams=hparams, tiny=tiny)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--precision=bf16" in run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert torch.isfinite(torch.tensor(summary["ssl_valid_loss_last"]))
