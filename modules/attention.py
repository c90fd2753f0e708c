"""Multi-head self-attention with rotary positions under a chunked, limited context.

Three computations of the same function:
- dense (``left = -1``): one SDPA call with a T x T mask (no mask at all when offline),
- banded (finite ``left``): queries in blocks of whole chunks, each block attending only to the
  ``left + block`` keys its window can reach, so time and memory grow linearly with T,
- streaming: one chunk at a time against a cache of the last ``left`` rotated keys and values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import Context, PiecewiseContext, chunk_attention_mask, chunk_windows


FLOAT64_DEVICE_TYPES = ("cpu", "cuda")  # MPS has no float64


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer): attention scores depend on relative position only.

    Angles are computed in float64 (positions reach tens of thousands of frames) where the device
    has it (``FLOAT64_DEVICE_TYPES``), else (MPS) in float32, identically offline and streaming.

    Arguments
    ---------
    head_dim : dimension of one attention head (even).
    base : wavelength base of the rotations.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._inv_freq = None  # (key, frequencies), made once per device and mode

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (T, head_dim / 2) in ``dtype``, of the (T,) absolute ``positions``."""
        device = positions.device
        precision = torch.float64 if device.type in FLOAT64_DEVICE_TYPES else torch.float32
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            inv_freq = self._frequencies(device, precision)
        else:
            key = (device, precision, torch.is_inference_mode_enabled())  # no inference tensor in training
            if self._inv_freq is None or self._inv_freq[0] != key:
                self._inv_freq = key, self._frequencies(device, precision)
            inv_freq = self._inv_freq[1]
        angles = positions.to(precision)[:, None] * inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _frequencies(self, device, precision: torch.dtype) -> torch.Tensor:
        return self.base ** (
            -torch.arange(0, self.head_dim, 2, dtype=precision, device=device) / self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Rotates (B, H, T, head_dim) ``x`` by the (T,) absolute ``positions`` (or by their
        precomputed ``angles``)."""
        cos, sin = angles if angles is not None else self.angles(positions, x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class RotarySelfAttention(torch.nn.Module):
    """Self-attention over (B, T, D) with rotary positions and a ``[left, right]`` context.

    Arguments
    ---------
    d_model : model dimension.
    nhead : number of heads.
    dropout : attention dropout.
    query_block : banded path: queries per block (rounded up to whole chunks).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, query_block: int = 32):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(d_model // nhead)
        self.dropout = dropout
        self.query_block = query_block

    def _project(self, x: torch.Tensor, first_position: int | torch.Tensor = 0):
        """(B, T, D) -> rotated q, k and v, each (B, H, T, head_dim); ``first_position``: the
        absolute position of frame 0 (an int, or a 0-d tensor in a compiled step)."""
        batch, frames, _ = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.nhead, -1).permute(2, 0, 3, 1, 4)
        positions = first_position + torch.arange(frames, device=x.device)
        angles = self.rotary.angles(positions, q.dtype)
        return self.rotary(q, positions, angles), self.rotary(k, positions, angles), v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, head_dim) -> (B, T, D) through the output projection."""
        batch, _, frames, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, frames, -1))

    def forward(self, x: torch.Tensor, context: Context, valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, banded: bool = True) -> torch.Tensor:
        """(B, T, D) -> (B, T, D).

        Arguments
        ---------
        x : input frames.
        context : ``[left, right]`` in frames, or a ``PiecewiseContext`` (dense masks).
        valid : (B, T) bool, False on padding (never attended to); None = no padding.
        lengths : unused (``valid`` carries the same information).
        banded : use the linear-cost computation when ``left`` is finite (False: dense mask,
            the reference the banded path is tested against).
        """
        q, k, v = self._project(x)
        dropout = self.dropout if self.training else 0.0
        if banded and not isinstance(context, PiecewiseContext) and context[0] >= 0:
            return self._merge(self._banded(q, k, v, context, valid, dropout))
        return self._merge(F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask(x.shape[1], context, valid, x.device), dropout_p=dropout))

    def _banded(self, q, k, v, context: Context, valid, dropout: float) -> torch.Tensor:
        """Blocks of whole chunks of queries, each against the keys its window can reach."""
        left, right = context
        batch, heads, frames, head_dim = q.shape
        chunk = right + 1
        block = chunk * max(1, -(-self.query_block // chunk))
        num_blocks = -(-frames // block)
        padded = num_blocks * block
        width = left + block
        q = F.pad(q, (0, 0, 0, padded - frames)).view(batch, heads, num_blocks, block, head_dim)
        # Keys of block n: padded positions [n * block, n * block + width) = frames
        # [n * block - left, (n + 1) * block), gathered by a strided view (unfold).
        k, v = (F.pad(t, (0, 0, left, padded - frames)).unfold(2, width, block).transpose(-1, -2)
                for t in (k, v))
        query_pos = torch.arange(padded, device=q.device).view(num_blocks, block)
        key_pos = (query_pos[:, :1] - left) + torch.arange(width, device=q.device)
        first, last = chunk_windows(padded, context, q.device)
        first, last = first.view(num_blocks, block, 1), last.view(num_blocks, block, 1)
        key_pos = key_pos[:, None, :]
        in_window = (key_pos >= first) & (key_pos <= last)
        key_ok = (key_pos >= 0) & (key_pos < frames)
        if valid is not None:
            valid_padded = F.pad(valid, (left, padded - frames))
            key_ok = key_ok & valid_padded.unfold(1, width, block)[:, :, None, :]  # (B, n, 1, W)
        # A padded query keeps itself, so no row is empty (finite outputs and gradients).
        mask = (in_window & key_ok) | (key_pos == query_pos[:, :, None])  # (B or 1, n, Q, W)
        mask = mask.expand(batch, num_blocks, block, width).reshape(-1, 1, block, width)
        # (B, H, n, ., Dh) -> (B * n, H, ., Dh): 4-D inputs keep SDPA's fused CPU/GPU kernels.
        q, k, v = (t.transpose(1, 2).reshape(batch * num_blocks, heads, -1, head_dim)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.view(batch, num_blocks, heads, block, head_dim).transpose(1, 2)
        return y.reshape(batch, heads, padded, head_dim)[:, :, :frames]

    def forward_streaming(self, x: torch.Tensor, cache: dict,
                          context: Context | tuple[Context, ...],
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk (B, C, D) -> (B, C, D); ``cache`` holds the last keys and values.

        ``context``: one pair, or one per stream (their lefts may differ). ``cache`` (filled in
        place): ``position`` (frames seen), ``k`` and ``v`` (B, H, <= keep, head_dim) with keep
        = ``cache["max_left"]`` when set (a stream that may switch), else the left context.
        Each stream attends to its chunk and its last ``left`` cached keys. ``valid`` (B, C):
        the chunk's padding frames are not attended to (a frame keeps itself).
        """
        if "left" in cache:
            return self._fixed_window_step(x, cache)
        lefts = [left for left, _ in ((context,) if isinstance(context[0], int) else context)]
        keep = cache.get("max_left", lefts[0])
        q, k, v = self._project(x, cache.get("position", 0))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if keep > 0:
            cache["k"], cache["v"] = k[:, :, -keep:], v[:, :, -keep:]
        chunk = x.shape[1]
        reach = max(lefts)
        if k.shape[2] > reach + chunk:  # keys no stream sees now (kept for a later switch)
            k, v = k[:, :, -(reach + chunk):], v[:, :, -(reach + chunk):]
        cached = k.shape[2] - chunk
        mask = None
        if valid is not None or min(lefts) < cached:
            keys = torch.arange(cached + chunk, device=x.device)
            first = cached - torch.tensor(lefts, device=x.device).clamp(max=cached)
            seen = keys[None] >= first[:, None]  # (B or 1, cached + C): the stream's window
            if valid is not None:
                seen = seen & F.pad(valid, (cached, 0), value=True)
            itself = F.pad(torch.eye(chunk, dtype=torch.bool, device=x.device), (cached, 0))
            mask = (seen[:, None, :] | itself)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        cache["position"] = cache.get("position", 0) + chunk
        return self._merge(y)

    def _fixed_window_step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """``forward_streaming`` of one stream with caches of a fixed size (shapes that never
        change, for ``modules.compiled_stream``): ``cache["k"]``, ``cache["v"]`` (1, H,
        window, head_dim) hold the last ``cache["window_size"]`` keys and values, zeros before
        the stream's start, of which the chunk sees the last ``cache["left"]``; ``cache["position"]`` (0-d tensor)
        counts the frames seen, ``cache["valid"]`` (0-d tensor) the chunk's frames that are real
        (the rest pads a short last chunk). Masked keys are those out of the left context,
        before the stream's start, and the padding (a frame keeps itself)."""
        window, left, chunk = cache["window_size"], cache["left"], x.shape[1]
        position, valid = cache["position"], cache["valid"]
        q, k, v = self._project(x, position)
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k[:, :, chunk:], v[:, :, chunk:]
        keys = torch.arange(window + chunk, device=x.device)
        seen = (keys >= window - position.clamp(max=left)) & (keys < window + valid)
        itself = keys[None, :] == window + torch.arange(chunk, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[None, :] | itself)
        return self._merge(y)


def dense_mask(frames: int, context: Context | PiecewiseContext, valid: torch.Tensor | None,
               device) -> torch.Tensor | None:
    """(B or 1, 1, T, T) bool mask: the chunk window minus padded keys (a frame keeps itself)."""
    if context == (-1, -1) and valid is None:
        return None  # full attention: PyTorch's fused kernel, no mask
    # With ``valid``, a mask even when nothing is padded: finding out would stop the host until
    # the GPU catches up, in every layer.
    if isinstance(context, PiecewiseContext):
        first, last = context.windows(frames, device)  # (B or 1, T)
        keys = torch.arange(frames, device=device)
        mask = (keys >= first[..., None]) & (keys <= last[..., None])
    else:
        mask = chunk_attention_mask(frames, context, device)[None]
    if valid is not None:
        itself = torch.eye(frames, dtype=torch.bool, device=device)
        mask = mask & (valid[:, None, :] | itself)
    return mask[:, None]
