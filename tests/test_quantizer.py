"""Random-projection quantizer: nearest-code search, frozen state, checkpointing."""
import pytest
import torch

from modules.quantizer import RandomProjectionQuantizer


def brute_force_codes(quantizer, feats):
    """Nearest code by explicit l2 distance, one frame at a time."""
    s = quantizer.subsampling_factor
    batch, frames, dim = feats.shape
    feats = torch.nn.functional.pad(feats, (0, 0, 0, -frames % s))
    stacked = feats.reshape(batch, -1, s * dim)
    codes = torch.empty(batch, stacked.shape[1], quantizer.num_books, dtype=torch.long)
    for book in range(quantizer.num_books):
        projected = torch.nn.functional.normalize(stacked @ quantizer.projection[book], dim=-1)
        for b in range(batch):
            distances = torch.cdist(projected[b], quantizer.codebooks[book])
            codes[b, :, book] = distances.argmin(-1)
    return codes


def test_codes_are_nearest_and_independent_of_row_blocking():
    quantizer = RandomProjectionQuantizer(n_mels=80, subsampling_factor=4, code_dim=16,
                                          num_classes=512, num_books=3, rows_per_step=7)
    feats = torch.randn(2, 61, 80)
    codes = quantizer(feats)
    assert codes.shape == (2, 16, 3)
    assert torch.equal(codes, brute_force_codes(quantizer, feats))
    quantizer.rows_per_step = 4096
    assert torch.equal(codes, quantizer(feats))


def test_frozen_seeded_and_saved():
    first = RandomProjectionQuantizer(num_classes=64, num_books=2, seed=5)
    assert list(first.parameters()) == []
    assert set(first.state_dict()) == {"projection", "codebooks"}
    assert torch.allclose(first.codebooks.norm(dim=-1), torch.ones(2, 64))
    assert torch.equal(first.codebooks, RandomProjectionQuantizer(num_classes=64, num_books=2,
                                                                  seed=5).codebooks)
    other = RandomProjectionQuantizer(num_classes=64, num_books=2, seed=6)
    assert not torch.equal(first.codebooks, other.codebooks)
    other.load_state_dict(first.state_dict())
    feats = torch.randn(1, 40, 80)
    assert torch.equal(first(feats), other(feats))


def test_uses_many_codes_on_varied_input():
    quantizer = RandomProjectionQuantizer(num_classes=64)
    codes = quantizer(torch.randn(4, 400, 80))
    assert codes.unique().numel() > 32
    assert codes.min() >= 0 and codes.max() < 64


def test_utterance_normalization_ignores_voice_offsets_and_padding():
    """Per-utterance targets: a constant spectral offset and gain per utterance (a voice's tilt
    and loudness) leave the codes unchanged, and padding does not enter the statistics."""
    quantizer = RandomProjectionQuantizer(num_classes=64, num_books=2,
                                          target_normalization="utterance")
    feats = torch.randn(2, 40, 80)
    tilt = torch.randn(2, 1, 80)
    assert torch.equal(quantizer(feats), quantizer(feats * 1.7 + tilt))
    padded = torch.cat([feats[:1], torch.full((1, 40, 80), 9.0)], dim=1)  # (1, 80, 80)
    codes = quantizer(padded, torch.tensor([0.5]))
    assert torch.equal(codes[:, :10], quantizer(feats[:1]))
    plain = RandomProjectionQuantizer(num_classes=64, num_books=2)
    assert not torch.equal(plain(feats), plain(feats * 1.7 + tilt))


def test_unknown_target_normalization_is_refused():
    with pytest.raises(ValueError, match="target_normalization must be one of .*utterance"):
        RandomProjectionQuantizer(target_normalization="speaker")
