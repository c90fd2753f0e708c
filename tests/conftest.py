"""Test set-up: the repository root and recipes/ are importable, and small shared fixtures."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled_scan: uses Mamba's compiled scan")


@pytest.fixture(autouse=True)
def _chunked_scan_by_default(request, monkeypatch):
    """Mamba's ``scan_backend: auto`` takes the eager chunked scan in tests (the path of MPS and
    CUDA without mamba-ssm); tests of the compiled CPU scan are marked ``compiled_scan``."""
    if "compiled_scan" not in request.keywords:
        monkeypatch.setattr("modules.mamba.compiled_scan_available", lambda device: False)


def tiny_encoder(subsampling_factor: int = 4, num_layers: int = 2, kernel_size: int = 5,
                 kind: str = "conformer"):
    """A small causal Conformer (or, ``kind="transformer"``, Transformer) in eval mode."""
    from modules.conformer import CausalConformerEncoder
    from modules.transformer import CausalTransformerEncoder

    sizes = dict(n_mels=80, d_model=32, nhead=4, num_encoder_layers=num_layers, d_ffn=64,
                 subsampling_factor=subsampling_factor, subsampling_conv_channels=8, dropout=0.0)
    if kind == "transformer":
        return CausalTransformerEncoder(**sizes).eval()
    return CausalConformerEncoder(kernel_size=kernel_size, **sizes).eval()


def offline_and_streamed_beams(log_probs: torch.Tensor, chunks: list[int], **beam_options):
    """Two ``CTCPrefixBeam``s over the same (T, V) log-probabilities: one pushed them all at
    once, the other chunk by chunk (``chunks``: frames per push)."""
    from modules.ctc import CTCPrefixBeam

    offline = CTCPrefixBeam(**beam_options)
    offline.push(log_probs)
    stream, start = CTCPrefixBeam(**beam_options), 0
    for size in chunks:
        stream.push(log_probs[start:start + size])
        start += size
    return offline, stream
