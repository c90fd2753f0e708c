"""Prediction heads for masked-token prediction."""
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


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor,
                      frame_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked encoder frames only, averaged over frames and codebooks.

    Arguments
    ---------
    logits : (B, T, num_books, num_classes).
    targets : (B, T, num_books) code indices.
    frame_mask : (B, T) bool, True where the frame was masked (padding is never masked).
    """
    return torch.nn.functional.cross_entropy(
        logits[frame_mask].float().flatten(0, 1), targets[frame_mask].flatten())
