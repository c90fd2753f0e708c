"""Causal Conformer encoder with chunked, limited-context self-attention and exact streaming."""
from __future__ import annotations

from typing import Sequence

from .attention import RotarySelfAttention
from .context import Context, validate_context
from .encoder import MacaronBlock, StreamingEncoder


class CausalConformerEncoder(StreamingEncoder):
    """Streaming Conformer: causal subsampling + blocks with chunked limited-context attention.

    Encoder frame ``t`` never depends on input after the end of its chunk: the subsampling
    reads no frame past its own group, attention stops at the chunk end, and the depthwise
    convolutions are causal. With ``[-1, -1]`` attention is full (offline). With a finite
    left context, attention cost grows linearly with length (banded computation).

    Arguments
    ---------
    n_mels : input feature dimension.
    d_model, nhead, num_encoder_layers, d_ffn, kernel_size : Conformer sizes.
    subsampling_factor : input frames per encoder frame (4 or 8).
    subsampling_conv_channels : channels of the subsampling convolutions.
    dropout : dropout rate.
    context : default ``[left, right]`` context in encoder frames (see ``set_context``).
    layer_left_contexts : optional per-layer cap on the left context (encoder frames), e.g.
        growing across layers; layer ``i`` uses ``min(left, layer_left_contexts[i])`` (the cap
        alone when ``left = -1``). The offline context ``[-1, -1]`` is never capped.

    Example
    -------
    >>> import torch
    >>> encoder = CausalConformerEncoder(n_mels=80, d_model=32, nhead=2, num_encoder_layers=2,
    ...                                  d_ffn=64, subsampling_conv_channels=8)
    >>> encoder(torch.randn(2, 100, 80), context=[16, 0]).shape
    torch.Size([2, 25, 32])
    """

    def __init__(self, n_mels: int = 80, d_model: int = 144, nhead: int = 4,
                 num_encoder_layers: int = 12, d_ffn: int = 576, kernel_size: int = 15,
                 subsampling_factor: int = 4, subsampling_conv_channels: int = 64,
                 dropout: float = 0.1, context: Context = (-1, -1),
                 layer_left_contexts: Sequence[int] | None = None):
        super().__init__(n_mels, d_model, subsampling_factor, subsampling_conv_channels, dropout)
        if layer_left_contexts is not None and (
                len(layer_left_contexts) != num_encoder_layers
                or any(int(v) < 0 for v in layer_left_contexts)):
            raise ValueError(f"layer_left_contexts needs {num_encoder_layers} values >= 0, "
                             f"got {layer_left_contexts}")
        self.layer_left_contexts = None if layer_left_contexts is None else [
            int(v) for v in layer_left_contexts]
        self.layers.extend(
            MacaronBlock(d_model, d_ffn, kernel_size, dropout,
                         RotarySelfAttention(d_model, nhead, dropout))
            for _ in range(num_encoder_layers))
        self.set_context(context)

    def layer_contexts(self, context: Context) -> list[Context]:
        """The context each layer applies under ``context`` (per-layer caps included)."""
        left, right = validate_context(context)
        if self.layer_left_contexts is None or right == -1:
            return [(left, right)] * len(self.layers)
        return [(cap if left == -1 else min(left, cap), right) for cap in self.layer_left_contexts]

    def narrowest_context(self, context: Context) -> Context:
        """The layer context with the smallest left window: what the masker must respect."""
        return min(self.layer_contexts(context), key=lambda c: float("inf") if c[0] == -1 else c[0])

    def check_streamable(self, context: Context, layer_contexts: list[Context]) -> None:
        """``left = -1`` would need a key/value cache that grows with the stream: refused."""
        super().check_streamable(context, layer_contexts)
        if any(left == -1 for left, _ in layer_contexts):
            raise ValueError(
                f"context {list(context)} cannot be streamed with a bounded cache: left = -1 keeps "
                "all the past; use a finite pair such as [32, 3] (or per-layer caps, "
                "layer_left_contexts)")
