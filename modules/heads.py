"""Prediction heads for masked-token prediction."""
from __future__ import annotations

import torch


class CodebookHeads(torch.nn.Module):
    """One linear classifier per codebook: (B, T, D) -> (B, T, num_books, num_classes) logits."""

    def __init__(self, d_model: int, num_books: int, num_classes: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear(d_model, num_classes) for _ in range(num_books))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, num_books, num_classes)."""
        return torch.stack([head(x) for head in self.heads], dim=2)


def masked_positions(frame_mask: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(B, T) bool mask -> (N,) flat indices of its True frames, on ``device``.

    Found where the mask lives (the recipe keeps it on the host) and copied without waiting:
    boolean indexing of a GPU tensor would stop the host until the GPU catches up.
    """
    return frame_mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked encoder frames only, averaged over frames and codebooks.

    Arguments
    ---------
    logits : (B, T, num_books, num_classes).
    targets : (B, T, num_books) code indices.
    positions : (N,) flat ``B * T`` indices of the masked frames (``masked_positions``; padding
        is never masked).
    """
    logits = logits.flatten(0, 1).index_select(0, positions)  # (N, books, classes)
    targets = targets.flatten(0, 1).index_select(0, positions)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
