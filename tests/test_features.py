"""Streaming-safe features: a frame depends only on its own samples."""
import torch

import math

import pytest

from modules.features import FbankStream, StreamingFbank


def test_frames_depend_only_on_their_own_samples():
    fbank = StreamingFbank()
    audio = torch.randn(1, 16000)
    full = fbank(audio)
    assert full.shape == (1, int(fbank.num_frames(torch.tensor(16000))), 80)
    for samples in (400, 1000, 8123):
        prefix = fbank(audio[:, :samples])
        assert prefix.shape[1] == int(fbank.num_frames(torch.tensor(samples)))
        assert torch.allclose(prefix, full[:, : prefix.shape[1]], atol=1e-5)


def test_no_per_utterance_clipping():
    """A loud burst later in the file must not change earlier frames (SpeechBrain's top_db does)."""
    fbank = StreamingFbank()
    quiet = torch.randn(1, 8000) * 1e-2
    loud = torch.cat([quiet, torch.randn(1, 8000)], dim=1)
    assert torch.allclose(fbank(quiet), fbank(loud)[:, : fbank(quiet).shape[1]], atol=1e-5)


def test_frame_counts():
    fbank = StreamingFbank()
    assert fbank.num_frames(torch.tensor([0, 399, 400, 559, 560])).tolist() == [0, 0, 1, 1, 2]
    assert fbank.min_samples(4) == 400 + 3 * 160


def test_energy_floor_is_per_frame_and_streams_exactly():
    """Digital silence sits at the floor, speech is untouched, and audio pushed in pieces gives
    the offline frames (the floor depends on nothing but the frame)."""
    fbank = StreamingFbank(log_floor=1e-5)
    speech = torch.randn(1, 8000) * 0.1
    audio = torch.cat([speech, torch.zeros(1, 8000), speech], dim=1)
    offline = fbank(audio)
    silence = offline[0, 60:90]  # frames wholly inside the zeros
    assert torch.allclose(silence, torch.full_like(silence, math.log(1e-5)))
    assert (offline[0, :40] > math.log(1e-5)).float().mean() > 0.99
    assert torch.equal(offline[0, :40], StreamingFbank(log_floor=1e-10)(audio)[0, :40])
    stream = FbankStream(fbank)
    pieces = [stream.push(audio[:, i:i + 777]) for i in range(0, audio.shape[1], 777)]
    assert torch.allclose(torch.cat(pieces, dim=1), offline, atol=1e-5)
    with pytest.raises(ValueError, match="log_floor"):
        StreamingFbank(log_floor=0)
