"""Selective scan, Mamba layer (mamba-ssm layout and reference, fused kernels that do not
import, bf16 windows), ConMamba guarantees 1-3 and 5."""
import importlib
import importlib.abc
import importlib.util
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import fake_mamba_kernels as fake
from conftest import ROOT
from modules import mamba as mamba_module
from modules.conmamba import ConMambaEncoder
from modules.mamba import Mamba
from modules import selective_scan as scan_module
from modules.selective_scan import (compiled_scan_available, selective_scan,
                                    selective_scan_sequential, window_correction)

NO_KERNEL = "the compiled scan needs a C++ compiler"
BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not compiled_scan_available("cpu"), reason=NO_KERNEL))]


# Mamba's scan_backend, for the guarantees (the compiled scan adds the fused window correction).
LAYER_BACKENDS = ["chunked", pytest.param("compiled", marks=[
    pytest.mark.compiled_scan, pytest.mark.skipif(not compiled_scan_available("cpu"), reason=NO_KERNEL)])]


@pytest.fixture(params=BACKENDS, ids=["chunked", "compiled"])
def compiled(request):
    """Both scans."""
    return request.param


def scan_inputs(batch=3, frames=75, dim=20, state=4, dtype=torch.float64):
    """Several blocks of frames; for the kernel, channels padded to 2 tiles and 2 threads that
    share a batch row."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, frames, dim, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, frames, dim, generator=g, dtype=dtype) - 1)
    A = -torch.rand(dim, state, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(batch, frames, state, generator=g, dtype=dtype)
    C = torch.randn(batch, frames, state, generator=g, dtype=dtype)
    h0 = torch.randn(batch, dim, state, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, h0)]


def test_scan_equals_sequential_values_and_gradients(compiled):
    inputs = scan_inputs()
    y, last, _ = selective_scan(*inputs, compiled=compiled)
    y_ref, last_ref = selective_scan_sequential(*inputs)
    assert (y - y_ref).abs().max() < 1e-10 and (last - last_ref).abs().max() < 1e-10
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum() + last.pow(2).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights).sum() + last_ref.pow(2).sum(), inputs)
    for name, g, g_ref in zip("u delta A B C h0".split(), grads, grads_ref):
        assert (g - g_ref).abs().max() < 1e-9, name


def test_scan_gradcheck_with_returned_states(compiled):
    u, delta, A, B, C, h0 = scan_inputs(batch=1, frames=11, dim=2, state=2)

    def run(*args):
        y, last, states = selective_scan(*args, state_stride=3, state_offset=1, compiled=compiled)
        return y, last, states
    assert torch.autograd.gradcheck(run, (u, delta, A, B, C, h0))


@pytest.mark.skipif(not compiled_scan_available("cpu"), reason=NO_KERNEL)
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_scan_float32_underflow_and_nan(threads):
    torch.set_num_threads(threads)
    u, delta, A, B, C, h0 = (t.detach().float() for t in scan_inputs())
    delta[:, 10] = 50.0  # exp(delta * A) below float32's range: the decay is 0
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, h0)]
    y, last, _ = selective_scan(*inputs, compiled=True)
    y_ref, last_ref = selective_scan_sequential(*inputs)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(last, last_ref, atol=1e-4)
    grads = torch.autograd.grad(y.sum(), inputs)
    grads_ref = torch.autograd.grad(y_ref.sum(), inputs)
    for name, g, g_ref in zip("u delta A B C h0".split(), grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-3), name
    with torch.no_grad():
        u[0, 20, 3] = float("nan")
        y = selective_scan(u, delta, A, B, C, h0, compiled=True)[0]
    assert y[0, 20:, 3].isnan().all() and not y[0, :20].isnan().any() and not y[1:].isnan().any()


@pytest.mark.skipif(not compiled_scan_available("cpu"), reason=NO_KERNEL)
def test_compiled_scan_refuses_growing_decays():
    u, delta, A, B, C, h0 = (t.detach() for t in scan_inputs())
    for bad_delta, bad_A in [(-delta, A), (delta, -A)]:
        with pytest.raises(ValueError, match="needs delta >= 0 and A <= 0"):
            selective_scan(u, bad_delta, bad_A, B, C, h0, compiled=True)


@pytest.mark.skipif(not compiled_scan_available("cpu"), reason=NO_KERNEL)
@pytest.mark.parametrize("chunk", [1, 3])
def test_compiled_window_correction_equals_eager(chunk):
    g = torch.Generator().manual_seed(0)
    batch, frames, dim, state = 2, 10, 20, 3  # channels padded to 2 tiles, a partial last chunk
    chunks = -(-frames // chunk)
    span = torch.rand(batch, frames, dim, generator=g, dtype=torch.float64) * 2
    A = -torch.rand(dim, state, generator=g, dtype=torch.float64) * 3
    C = torch.randn(batch, frames, state, generator=g, dtype=torch.float64)
    states = torch.randn(batch, chunks + 2, dim, state, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (span, A, C, states)]
    corr, corr_ref = (window_correction(*inputs, chunk, first_state=1, compiled=c)
                      for c in (True, False))
    assert (corr - corr_ref).abs().max() < 1e-12
    weights = torch.randn_like(corr)
    grads, grads_ref = (torch.autograd.grad((out * weights).sum(), inputs) for out in (corr, corr_ref))
    for name, grad, grad_ref in zip(["span", "A", "C", "states"], grads, grads_ref):
        assert (grad - grad_ref).abs().max() < 1e-11, name  # unused states: 0 in both
    small = [span.detach()[:1, :4, :2], A.detach()[:2], C.detach()[:1, :4],
             states.detach()[:1, :, :2]]
    assert torch.autograd.gradcheck(lambda *a: window_correction(*a, chunk, 1, compiled=True),
                                    [t.requires_grad_() for t in small])
    with pytest.raises(ValueError, match=r"C must have shape \(1, 4, 3\), got \(1, 4, 2\)"):
        window_correction(small[0], small[1], small[2][..., :2], small[3], chunk, compiled=True)
    with pytest.raises(ValueError, match=r"states\[:, 1:\d\] must have shape"):  # too few
        window_correction(*small[:3], small[3][:, :-(-4 // chunk)], chunk, 1, compiled=True)


@pytest.mark.compiled_scan
def test_failed_kernel_build_falls_back_to_the_chunked_scan(monkeypatch, caplog):
    def failing():
        raise RuntimeError("g++ failed: error: unrecognized option\ndetails")
    monkeypatch.setattr(scan_module, "_build_kernel", failing)
    scan_module._kernel.cache_clear()
    try:
        auto = Mamba(d_model=8, d_state=4).double()
        chunked = Mamba(d_model=8, d_state=4, scan_backend="chunked").double()
        chunked.load_state_dict(auto.state_dict())
        x = torch.randn(2, 23, 8, dtype=torch.float64)
        for _ in range(2):
            assert torch.equal(auto(x), chunked(x))
        with pytest.raises(RuntimeError, match="compiled scan needs CPU tensors"):
            selective_scan(*scan_inputs(), compiled=True)
        with pytest.raises(RuntimeError, match="scan_backend 'compiled' needs"):
            Mamba(d_model=8, d_state=4, scan_backend="compiled").double()(x)
    finally:
        scan_module._kernel.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "chunked scan" in r.getMessage()]
    assert warnings == ["the compiled selective scan is unavailable, using the chunked scan: "
                        "g++ failed: error: unrecognized option"]  # once, first line only


def test_initial_and_final_states_split_a_sequence(compiled):
    u, delta, A, B, C, _ = scan_inputs(frames=90)
    y, last, states = selective_scan(u, delta, A, B, C, state_stride=10, state_offset=9,
                                     compiled=compiled)
    first, middle, _ = selective_scan(u[:, :37], delta[:, :37], A, B[:, :37], C[:, :37],
                                      compiled=compiled)
    second, end, _ = selective_scan(u[:, 37:], delta[:, 37:], A, B[:, 37:], C[:, 37:],
                                    initial_state=middle, compiled=compiled)
    assert (torch.cat([first, second], 1) - y).abs().max() < 1e-10
    assert (end - last).abs().max() < 1e-10
    assert states.shape[1] == 9 and (states[:, -1] - last).abs().max() < 1e-10


def reference_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """mamba-ssm's selective_scan_ref semantics, (B, D, L) layout, written out per frame."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        h = torch.exp(delta[:, :, i, None] * A) * h + (delta[:, :, i] * u[:, :, i])[..., None] * B[:, None, :, i]
        ys.append((h * C[:, None, :, i]).sum(-1))
    return (torch.stack(ys, 2) + u * D[:, None]) * F.silu(z)


def reference_mamba(layer, x):
    """mamba_simple.Mamba's slow path (conv1d with padding d_conv - 1, then [..., :L])."""
    length = x.shape[1]
    xz = layer.in_proj(x).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    u = F.silu(layer.conv1d(u)[..., :length])
    dt, B, C = layer.x_proj(u.transpose(1, 2)).split(
        [layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    dt = (dt @ layer.dt_proj.weight.T).transpose(1, 2)
    y = reference_selective_scan(u, dt, -torch.exp(layer.A_log), B.transpose(1, 2),
                                 C.transpose(1, 2), layer.D, z, layer.dt_proj.bias)
    return layer.out_proj(y.transpose(1, 2))


def test_mamba_matches_mamba_ssm_reference_unlimited_context():
    layer = Mamba(d_model=16, d_state=8, d_conv=4, expand=2)
    x = torch.randn(2, 57, 16)
    assert (layer(x, (-1, -1)) - reference_mamba(layer, x)).abs().max() < 1e-5
    assert (layer(x, (-1, 0)) - reference_mamba(layer, x)).abs().max() < 1e-5


def test_mamba_ssm_parameter_layout_and_round_trip():
    d_model, d_state, d_conv, expand = 32, 16, 4, 2
    layer = Mamba(d_model, d_state, d_conv, expand)
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    expected = {  # mamba_ssm.modules.mamba_simple.Mamba with bias=False, conv_bias=True
        "in_proj.weight": (2 * d_inner, d_model), "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,), "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank), "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state), "D": (d_inner,), "out_proj.weight": (d_model, d_inner)}
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    assert torch.allclose(layer.A_log.exp(), torch.arange(1, 17.0).repeat(d_inner, 1))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    other = Mamba(d_model, d_state, d_conv, expand)
    other.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(1, 20, d_model)
    assert torch.equal(layer(x, (8, 1)), other(x, (8, 1)))


@pytest.mark.compiled_scan
@pytest.mark.skipif(not compiled_scan_available("cpu"), reason=NO_KERNEL)
def test_mamba_layer_compiled_scan_equals_chunked():
    chunked = Mamba(d_model=8, d_state=4, scan_backend="chunked").double()
    compiled = Mamba(d_model=8, d_state=4, scan_backend="compiled").double()
    compiled.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 23, 8, dtype=torch.float64, requires_grad=True)
    for context in [(-1, -1), (6, 1), (3, 0), (2, 4)]:  # chunks of 1 and 5, windows 3 and 2
        y, y_ref = compiled(x, context), chunked(x, context)
        assert (y - y_ref).abs().max() < 1e-10
        grad, grad_ref = (torch.autograd.grad(out.pow(2).sum(), x)[0] for out in (y, y_ref))
        assert (grad - grad_ref).abs().max() < 1e-10
    with torch.no_grad():  # no states saved for a backward pass
        assert (compiled(x, (6, 1)) - chunked(x, (6, 1))).abs().max() < 1e-10
    with pytest.raises(ValueError, match="scan_backend must be one of"):
        Mamba(d_model=8, scan_backend="cuda")


UNDEFINED_SYMBOL = ("selective_scan_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                    "_ZN3c104cuda9SetDeviceEi")


class BrokenKernels(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """mamba-ssm and causal-conv1d as wheels built against another torch: found, not loadable."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in mamba_module.FUSED_PACKAGES:
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(UNDEFINED_SYMBOL)


def import_kernels(monkeypatch) -> str | None:
    """Re-run ``modules.mamba``'s import of the kernels; returns its error."""
    kernels = mamba_module._import_fused_kernels()
    for name, value in zip(("selective_scan_fn", "causal_conv1d_fn", "FUSED_IMPORT_ERROR"),
                           kernels):
        monkeypatch.setattr(mamba_module, name, value)
    return kernels[2]


def check_fused_on_cpu(monkeypatch) -> dict:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check").check_fused("cpu", quick=True)


def test_installed_kernels_that_do_not_import_are_reported(monkeypatch, caplog):
    monkeypatch.setattr(sys, "meta_path", [BrokenKernels(), *sys.meta_path])
    with caplog.at_level(logging.WARNING, logger="modules.mamba"):
        error = import_kernels(monkeypatch)
    assert error == f"ImportError: {UNDEFINED_SYMBOL}" and mamba_module.selective_scan_fn is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert UNDEFINED_SYMBOL in warning and "pip install --no-build-isolation" in warning
    with pytest.raises(RuntimeError, match="scan_backend 'fused': .*undefined symbol"):
        Mamba(d_model=8, scan_backend="fused")
    layer = Mamba(d_model=8)
    assert layer.backend_for("cuda") == layer.backend_for("cpu") == "chunked"  # auto: eager scan
    report = check_fused_on_cpu(monkeypatch)
    assert not report["passed"] and report["backend"] == "chunked"
    assert UNDEFINED_SYMBOL in report["error"]


def test_kernels_not_installed_are_a_labelled_skip(monkeypatch, caplog):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: (
        None if name in mamba_module.FUSED_PACKAGES else find_spec(name, package)))
    assert import_kernels(monkeypatch) is None and not caplog.records
    with pytest.raises(RuntimeError, match="scan_backend 'fused': .* not installed"):
        Mamba(d_model=8, scan_backend="fused")
    report = check_fused_on_cpu(monkeypatch)
    assert report["passed"] and "not installed" in report["skipped"]
    assert report["backend"] == "chunked"


def test_fused_backend_needs_the_kernels_device(monkeypatch):
    monkeypatch.setattr(mamba_module, "selective_scan_fn", fake.selective_scan_fn)
    monkeypatch.setattr(mamba_module, "causal_conv1d_fn", fake.causal_conv1d_fn)
    layer = Mamba(d_model=8, d_state=4, scan_backend="fused")
    x = torch.randn(1, 45, 8)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(mamba-ssm's kernels\), got cpu"):
        layer(x)
    monkeypatch.setattr(mamba_module, "FUSED_DEVICE_TYPES", ("cpu",))  # the stand-ins run here
    fake.calls.update(scan=0, conv=0)
    auto = Mamba(d_model=8, d_state=4)
    auto.load_state_dict(layer.state_dict())
    assert [layer.backend_for("cpu", c) for c in [(-1, -1), (8, 0), (40, 0)]] == [
        "fused", "fused", "chunked"]  # a window of 41 chunks: the window correction
    assert torch.equal(layer(x, (8, 0)), auto(x, (8, 0))) and fake.calls["scan"] > 0


@pytest.mark.parametrize("context", [(8, 3), (16, 3)])
def test_windowed_scan_under_bf16_autocast_subtracts_in_float32(context):
    """A window is a full scan minus the state carried into it: on long utterances with slow
    decays, two nearly equal numbers, subtracted in float32 before bf16 rounds the result (in
    bf16, errors several times those of the unlimited context's scan)."""
    layer = Mamba(d_model=16, d_state=8, dt_min=1e-4, dt_max=1e-3)  # long memory
    with torch.no_grad():
        layer.D.zero_()  # the output is the scan's, not the skip connection's
    x = torch.randn(1, 400, 16)
    errors = []
    for c in [(-1, -1), context]:
        with torch.no_grad():
            expected = layer(x, c)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = layer(x, c)
        errors.append(float((got.float() - expected).abs().max() / expected.abs().max()))
    assert errors[1] < 1.5 * errors[0], errors


def tiny_conmamba(**kwargs):
    return ConMambaEncoder(d_model=32, num_encoder_layers=2, d_ffn=64, kernel_size=5,
                           subsampling_conv_channels=8, dropout=0.0, d_state=8, **kwargs).eval()


@pytest.mark.parametrize("context", [(-1, 0), (0, 0), (3, 0), (4, 2), (-1, 3)])
def test_conmamba_no_future_leak(context):
    encoder, s = tiny_conmamba(), 4
    feats = torch.randn(1, 22 * s + 2, 80, requires_grad=True)
    out = encoder(feats, context=context)
    weights = torch.randn(out.shape[-1])
    for t in range(out.shape[1]):
        (grad,) = torch.autograd.grad((out[0, t] * weights).sum(), feats, retain_graph=True)
        last = grad[0].abs().sum(-1).nonzero().max()
        assert last == min((t + 1) * s, feats.shape[1]) - 1, t  # own group of s frames, no more


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
@pytest.mark.parametrize("context", [(0, 0), (3, 0), (5, 2), (2, 3)])
def test_mamba_layer_bounded_past(context, backend):
    """Output t reads SSM inputs [chunk_start - left, t], i.e. layer inputs from d_conv - 1 before.

    Offline, the window is one full scan minus the state carried in from before the window, so
    older inputs cancel to rounding (float64: < 1e-12 of the gradient); streaming rescans the
    window itself and never holds them.
    """
    layer = Mamba(d_model=8, d_state=4, d_conv=4, scan_backend=backend).double()
    x = torch.randn(1, 40, 8, requires_grad=True, dtype=torch.float64)
    out = layer(x, context)
    left, right = context
    for t in range(40):
        (grad,) = torch.autograd.grad(out[0, t].pow(2).sum(), x, retain_graph=True)
        size = grad[0].abs().sum(-1)
        depends = (size > 1e-12 * size.max()).nonzero().flatten()
        chunk_start = t - t % (right + 1)
        assert depends.min() == max(0, chunk_start - left - 3) and depends.max() == t, t


@pytest.mark.parametrize("context", [(-1, 0), (-1, 3), (0, 0), (6, 0), (4, 2), (8, 3)])
@pytest.mark.parametrize("s", [4, 8])
@pytest.mark.parametrize("backend", LAYER_BACKENDS)
def test_conmamba_streaming_equals_offline(context, s, backend):
    encoder = tiny_conmamba(subsampling_factor=s, scan_backend=backend).double()
    feats = torch.randn(2, 29 * s + 3, 80, dtype=torch.float64)
    offline = encoder(feats, context=context)
    state = encoder.make_streaming_context(context)
    size = encoder.chunk_frames(state)
    streamed = torch.cat([encoder.forward_streaming(feats[:, i:i + size], state)
                          for i in range(0, feats.shape[1], size)], dim=1)
    assert (streamed - offline).abs().max() < 1e-6
    for layer in state.layers:  # bounded: a window of `left` frames, or one fixed-size state
        if context[0] == -1:
            assert layer.mixer["state"].shape == (2, 64, 8)
        elif context[0] > 0:
            assert layer.mixer["window"].shape[1] == context[0]


def test_conmamba_batch_independence():
    encoder = tiny_conmamba(bidirectional=False)
    short, long = torch.randn(1, 70, 80), torch.randn(1, 123, 80)
    batch = torch.zeros(2, 123, 80)
    batch[0, :70], batch[1] = short[0], long[0]
    out = encoder(batch, torch.tensor([70 / 123, 1.0]), (6, 1))
    alone = encoder(short, context=(6, 1))
    assert (out[0, : alone.shape[1]] - alone[0]).abs().max() < 1e-5


def test_bidirectional_variant_is_offline_only():
    encoder = tiny_conmamba(bidirectional=True)
    short = torch.randn(1, 70, 80)
    batch = torch.cat([short, torch.zeros(1, 30, 80)], dim=1)
    assert (encoder(batch, torch.tensor([0.7]))[:, :18] - encoder(short)).abs().max() < 1e-5
    feats = torch.randn(1, 80, 80, requires_grad=True)
    (grad,) = torch.autograd.grad(encoder(feats)[0, 0].pow(2).sum(), feats)
    assert grad[0, -1].abs().sum() > 0  # the backward direction sees the future
    with pytest.raises(ValueError, match="cannot stream"):
        encoder.make_streaming_context()
    with pytest.raises(ValueError, match="offline only"):
        encoder(feats, context=(8, 1))
    assert tiny_conmamba().narrowest_context((16, 3)) == (16, 0)
