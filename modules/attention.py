"""Multi-head self-attention with rotary positions and a chunked, limited-context mask."""
import torch


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer): attention scores depend on relative position only.

    Arguments
    ---------
    head_dim : dimension of one attention head (even).
    base : wavelength base of the rotations.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotates (B, H, T, head_dim) ``x`` by the (T,) absolute ``positions``."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class RotarySelfAttention(torch.nn.Module):
    """Self-attention over (B, T, D) with rotary positions and a boolean attention mask.

    Arguments
    ---------
    d_model : model dimension.
    nhead : number of heads.
    dropout : attention dropout.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(d_model // nhead)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); ``attn_mask`` (B, 1, T, T) bool, True = may attend, or None."""
        batch, frames, dim = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.nhead, -1).permute(2, 0, 3, 1, 4)
        positions = torch.arange(frames, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, frames, dim))
