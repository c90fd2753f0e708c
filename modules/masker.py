"""Causal block masker for masked-token prediction, kept in sync with the streaming context.

Blocks are drawn on encoder frames (so each encoder frame is either fully masked or fully
visible) and expanded to the ``s`` input frames of each encoder frame. After drawing, every
chunk whose attention window (``left`` frames before the chunk start up to the chunk end)
holds no visible frame gets its last valid frame unmasked: a masked frame then always has
visible input that its attention can reach (design.md, guarantee 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import Context, chunk_windows, validate_context


def encoder_frame_mask(input_mask: torch.Tensor, subsampling_factor: int) -> torch.Tensor:
    """(B, T) input-frame mask -> (B, ceil(T / s)) encoder-frame mask.

    An encoder frame counts as masked when most of its ``s`` input frames are masked.
    """
    batch, frames = input_mask.shape
    pad = -frames % subsampling_factor
    padded = torch.nn.functional.pad(input_mask.float(), (0, pad))
    return padded.view(batch, -1, subsampling_factor).mean(-1) > 0.5


def masked_frame_counts(frame_mask: torch.Tensor, enc_lengths: torch.Tensor,
                        context: Context) -> torch.Tensor:
    """What masking really did to a batch: (3,) counts of valid encoder frames, masked frames,
    and masked frames with a visible frame after them in their window (the others can only be
    predicted by forecasting from the past).

    Arguments
    ---------
    frame_mask : (B, T) bool encoder-frame mask.
    enc_lengths : (B,) valid encoder frames.
    context : the window the model applies (e.g. ``encoder.narrowest_context``).
    """
    batch, frames = frame_mask.shape
    positions = torch.arange(frames, device=frame_mask.device)
    valid = positions[None] < enc_lengths[:, None]
    masked = frame_mask & valid
    visible = F.pad((valid & ~masked).long().cumsum(1), (1, 0))  # (B, T + 1)
    _, last = chunk_windows(frames, context, frame_mask.device)
    last = torch.minimum(last[None].expand(batch, -1), enc_lengths[:, None] - 1).clamp(min=0)
    future = (visible.gather(1, last + 1) - visible[:, 1:]) > 0
    return torch.stack([valid.sum(), masked.sum(), (masked & future).sum()]).cpu()


class CausalBlockMasker(torch.nn.Module):
    """Block masking of (B, T, n_mels) features, driven by a ``[left, right]`` context.

    Arguments
    ---------
    n_mels : feature dimension (size of the mask embedding).
    subsampling_factor : input frames per encoder frame.
    mask_prob : ``mask_prob * frames / block`` blocks are drawn per utterance; with
        ``allow_overlap`` they overlap, so fewer frames end up masked (about 36 % at 0.45 with
        5-frame blocks on the shipped corpus; ``masked_frame_counts`` measures it).
    block_size : length of a mask block in input frames (rounded to whole encoder frames).
    allow_overlap : whether blocks may overlap; without overlap they are placed in disjoint
        positions and cover ``mask_prob`` of the frames.
    learnable_mask : learn the mask embedding; otherwise it is frozen, drawn from N(0, 0.1^2).
    context : default context, used when ``forward`` gets none (see ``set_context``).

    ``draw`` samples a mask (no gradient); ``forward`` applies it, so that a learnable mask
    embedding is trained through the module's forward (as DDP requires).

    Example
    -------
    >>> masker = CausalBlockMasker(n_mels=80, subsampling_factor=4, mask_prob=0.4, block_size=8)
    >>> feats = torch.randn(2, 100, 80)
    >>> mask = masker.draw(feats, torch.tensor([100, 60]), context=(8, 0))
    >>> mask.shape, bool(mask[1, 60:].any()), masker(feats, mask).shape
    (torch.Size([2, 100]), False, torch.Size([2, 100, 80]))
    """

    def __init__(
        self,
        n_mels: int = 80,
        subsampling_factor: int = 4,
        mask_prob: float = 0.4,
        block_size: int = 40,
        allow_overlap: bool = True,
        learnable_mask: bool = False,
        context: Context = (-1, -1),
    ):
        super().__init__()
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 input frame, got {block_size}")
        self.subsampling_factor = subsampling_factor
        self.mask_prob = mask_prob
        self.block_frames = max(1, round(block_size / subsampling_factor))
        self.allow_overlap = allow_overlap
        embedding = torch.randn(n_mels) * 0.1
        if learnable_mask:
            self.mask_embedding = torch.nn.Parameter(embedding)
        else:
            self.register_buffer("mask_embedding", embedding)
        self.context = self.check_context(context)

    def set_context(self, context: Context) -> None:
        """Fixes the context used when ``forward`` is called without one."""
        self.context = self.check_context(context)

    @staticmethod
    def check_context(context: Context) -> Context:
        """Rejects ``[0, 0]``: a frame that sees only itself can never be masked."""
        context = validate_context(context)
        if context == (0, 0):
            raise ValueError(
                "context [0, 0]: each frame sees only itself, so no frame can be masked; "
                "use left >= 1 or right >= 1 for masked-token training"
            )
        return context

    @torch.no_grad()
    def draw(self, feats: torch.Tensor, lengths: torch.Tensor, context: Context | None = None,
             generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Draws a mask.

        Arguments
        ---------
        feats : (B, T, n_mels) features (only their shape and device are used).
        lengths : (B,) true lengths in input frames; padding is never masked.
        context : the sampled ``[left, right]`` context (None: the fixed one).
        generator : random generator (on CPU), e.g. a fixed one for validation.
        device : where the mask goes (None: ``feats``' device). Masks are drawn on the CPU; the
            recipe keeps them there (``"cpu"``) for host-side counts and copies them itself.
            Lengths on the CPU avoid a GPU sync.

        Returns
        -------
        (B, T) bool input-frame mask, True = masked.
        """
        context = self.context if context is None else self.check_context(context)
        batch, frames = feats.shape[:2]
        s = self.subsampling_factor
        enc_frames = -(-frames // s)
        enc_lengths = torch.div(lengths.cpu() + s - 1, s, rounding_mode="floor")
        mask = torch.stack([self._draw(int(n), enc_frames, generator) for n in enc_lengths])
        mask = self._keep_visible_in_window(mask, enc_lengths, context)
        input_mask = mask.repeat_interleave(s, dim=1)[:, :frames]
        valid = torch.arange(frames)[None, :] < lengths.cpu()[:, None]
        return (input_mask & valid).to(feats.device if device is None else device,
                                       non_blocking=True)

    def forward(self, feats: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Replaces masked input frames of (B, T, n_mels) ``feats`` by the mask embedding."""
        return torch.where(input_mask[..., None], self.mask_embedding.to(feats.dtype), feats)

    def _draw(self, length: int, total: int, generator) -> torch.Tensor:
        """Block mask over ``total`` encoder frames, drawn within the first ``length``."""
        mask = torch.zeros(total, dtype=torch.bool)
        block = min(self.block_frames, length)
        num_blocks = round(self.mask_prob * length / max(block, 1))
        if length < 2 or num_blocks == 0:
            return mask
        if self.allow_overlap:
            starts = torch.randint(0, length - block + 1, (num_blocks,), generator=generator)
        else:
            # Disjoint blocks: choose block slots among the frames left once blocks shrink to 1.
            num_blocks = min(num_blocks, length // block)
            slots = length - num_blocks * (block - 1)
            starts = torch.randperm(slots, generator=generator)[:num_blocks].sort().values
            starts = starts + torch.arange(num_blocks) * (block - 1)
        covered = (starts[:, None] + torch.arange(block)[None, :]).flatten()
        mask[covered] = True
        return mask

    @staticmethod
    def _keep_visible_in_window(mask: torch.Tensor, enc_lengths: torch.Tensor,
                                context: Context) -> torch.Tensor:
        """Unmasks the last valid frame of every chunk whose window has no visible frame.

        One pass is enough: unmasking only adds visible frames, and each repair lies in its own
        chunk's window.
        """
        batch, frames = mask.shape
        first, last = chunk_windows(frames, context)
        positions = torch.arange(frames)
        valid = positions[None, :] < enc_lengths[:, None]
        mask = mask & valid
        visible = (valid & ~mask).long()
        visible_before = torch.nn.functional.pad(visible.cumsum(1), (1, 0))  # (B, T + 1)
        last_valid = torch.minimum(last[None, :].expand(batch, -1), enc_lengths[:, None] - 1)
        visible_in_window = (visible_before.gather(1, last_valid.clamp(min=0) + 1)
                             - visible_before[:, first])
        starved = mask & (visible_in_window == 0)
        rows, cols = starved.nonzero(as_tuple=True)
        mask[rows, last_valid[rows, cols]] = False
        return mask

    def extra_repr(self) -> str:
        return (f"mask_prob={self.mask_prob}, block_frames={self.block_frames}, "
                f"allow_overlap={self.allow_overlap}, context={list(self.context)}")
