"""Streaming-safe features: a frame depends only on its own samples."""
import torch

from modules.features import StreamingFbank


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
    quiet = torch.randn(1, 8000) * 1e-4
    loud = torch.cat([quiet, torch.randn(1, 8000)], dim=1)
    assert torch.allclose(fbank(quiet), fbank(loud)[:, : fbank(quiet).shape[1]], atol=1e-5)


def test_frame_counts():
    fbank = StreamingFbank()
    assert fbank.num_frames(torch.tensor([0, 399, 400, 559, 560])).tolist() == [0, 0, 1, 1, 2]
    assert fbank.min_samples(4) == 400 + 3 * 160
