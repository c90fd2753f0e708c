"""The causal masker: guarantee 4 (masker in sync with the sampled context), lengths, loss."""
import pytest
import torch

from modules.context import ContextSampler
from modules.heads import masked_positions, masked_token_loss
from modules.masker import CausalBlockMasker, encoder_frame_mask, masked_frame_counts

PRESETS = {"very_low": [8, 0], "low": [16, 1], "medium": [32, 3], "high": [64, 7],
           "unlimited": [-1, -1]}


def reachable_window(t: int, length: int, context) -> range:
    """Encoder frames that frame t's attention reaches, written from design.md's definition."""
    left, right = context
    if right == -1:
        return range(0, length)
    chunk_start = (t // (right + 1)) * (right + 1)
    start = 0 if left == -1 else max(0, chunk_start - left)
    return range(start, min(length, chunk_start + right + 1))


def assert_in_sync(input_mask, lengths, s, context):
    frame_mask = encoder_frame_mask(input_mask, s)
    for b, length in enumerate(lengths.tolist()):
        assert not input_mask[b, length:].any(), "padding was masked"
        enc_length = -(-length // s)
        assert not frame_mask[b, enc_length:].any()
        for t in frame_mask[b, :enc_length].nonzero().flatten().tolist():
            window = reachable_window(t, enc_length, context)
            assert any(not frame_mask[b, k] for k in window), (b, t, context)


@pytest.mark.parametrize("allow_overlap", [True, False])
@pytest.mark.parametrize("s", [4, 8])
def test_every_sampled_context_keeps_visible_input_in_window(allow_overlap, s):
    sampler = ContextSampler(list(PRESETS) + [[1, 0], [0, 1], [2, 2]], presets=PRESETS, seed=3)
    masker = CausalBlockMasker(subsampling_factor=s, mask_prob=0.8, block_size=6 * s,
                               allow_overlap=allow_overlap)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        context = sampler.sample()
        seen.add(context)
        lengths = torch.randint(s, 400, (4,), generator=generator)
        feats = torch.randn(4, int(lengths.max()), 80)
        mask = masker.draw(feats, lengths, context, generator=generator)
        assert mask.shape == feats.shape[:2] and mask.dtype == torch.bool
        assert_in_sync(mask, lengths, s, context)
    assert (-1, -1) in seen and (0, 1) in seen


def test_masked_fraction_follows_mask_prob():
    masker = CausalBlockMasker(subsampling_factor=4, mask_prob=0.4, block_size=20,
                               allow_overlap=False)
    lengths = torch.full((8,), 2000)
    mask = masker.draw(torch.randn(8, 2000, 80), lengths, context=(64, 7))
    assert abs(mask.float().mean().item() - 0.4) < 0.03
    runs = torch.diff(mask[0].int(), prepend=torch.zeros(1, dtype=torch.int))
    assert (runs == 1).sum() >= 10  # several blocks, not one


def test_without_overlap_blocks_cover_exactly_their_share():
    masker = CausalBlockMasker(subsampling_factor=4, mask_prob=0.3, block_size=20,
                               allow_overlap=False)
    for seed in range(20):
        mask = masker._draw(length=400, total=450, generator=torch.Generator().manual_seed(seed))
        assert mask.sum() == round(0.3 * 400 / 5) * 5  # 24 whole blocks of 5, none overlapping
        assert not mask[400:].any()


def test_frame_that_sees_only_itself_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 0\]"):
        CausalBlockMasker().draw(torch.randn(1, 40, 80), torch.tensor([40]), context=(0, 0))


def test_mask_embedding_frozen_or_learned():
    frozen = CausalBlockMasker(learnable_mask=False)
    assert not list(frozen.parameters()) and "mask_embedding" in frozen.state_dict()
    assert 0.05 < frozen.mask_embedding.std() < 0.2
    learned = CausalBlockMasker(learnable_mask=True)
    assert [p.shape for p in learned.parameters()] == [torch.Size([80])]
    feats = torch.randn(1, 12, 80)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:8] = True
    out = frozen(feats, mask)
    assert torch.equal(out[0, 4], frozen.mask_embedding) and torch.equal(out[0, :4], feats[0, :4])


def test_encoder_frame_is_masked_when_most_of_its_inputs_are():
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    assert encoder_frame_mask(mask, 4).tolist() == [[True, False, False]]


def test_loss_uses_masked_frames_only():
    logits = torch.randn(2, 6, 2, 10)
    targets = torch.randint(0, 10, (2, 6, 2))
    frame_mask = torch.zeros(2, 6, dtype=torch.bool)
    frame_mask[0, 1], frame_mask[1, 4] = True, True
    positions = masked_positions(frame_mask, logits.device)
    assert positions.tolist() == [1, 10]
    loss = masked_token_loss(logits, targets, positions)
    changed = logits.clone()
    changed[~frame_mask] = torch.randn_like(changed[~frame_mask]) * 100
    assert torch.allclose(loss, masked_token_loss(changed, targets, positions))
    expected = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, 1], logits[1, 4]]), torch.cat([targets[0, 1], targets[1, 4]]))
    assert torch.allclose(loss, expected)


def test_masked_frame_counts_by_hand():
    """6 valid frames of 8, frames 1-4 masked; chunks of 2 under [4, 1]: only frame 4 has a
    visible frame (5) after it inside its chunk. Offline, all four see frame 5."""
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)  # 6-7: padding
    lengths = torch.tensor([6])
    assert masked_frame_counts(mask, lengths, (4, 1)).tolist() == [6, 4, 1]
    assert masked_frame_counts(mask, lengths, (-1, -1)).tolist() == [6, 4, 4]
    assert masked_frame_counts(mask, lengths, (4, 0)).tolist() == [6, 4, 0]
