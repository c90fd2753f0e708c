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
