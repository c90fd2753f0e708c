"""Causal Conformer encoder with chunked, limited-context self-attention and exact streaming."""
from __future__ import annotations

from typing import Sequence

from .attention import RotarySelfAttention
from .context import Context
from .encoder import AttentionEncoder, MacaronBlock


class CausalConformerEncoder(AttentionEncoder):
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
    layer_left_contexts : optional per-layer cap on the left context, see ``AttentionEncoder``.
    activation_checkpointing : recompute each block in the backward pass when training (less
        memory on long utterances, more compute; same outputs and gradients), see
        ``StreamingEncoder``.

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
                 layer_left_contexts: Sequence[int] | None = None,
                 activation_checkpointing: bool = False):
        super().__init__(n_mels, d_model, num_encoder_layers, subsampling_factor,
                         subsampling_conv_channels, dropout, layer_left_contexts,
                         activation_checkpointing)
        self.layers.extend(
            MacaronBlock(d_model, d_ffn, kernel_size, dropout,
                         RotarySelfAttention(d_model, nhead, dropout))
            for _ in range(num_encoder_layers))
        self.set_context(context)
