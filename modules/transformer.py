"""Causal Transformer encoder: the Conformer without its convolution module (the baseline of
Conformer / ConMamba comparisons), with the same chunked limited-context attention."""
from __future__ import annotations

from typing import Sequence

import torch

from .attention import RotarySelfAttention
from .context import Context
from .encoder import AttentionEncoder, LayerState
from .layers import FeedForward


class TransformerBlock(torch.nn.Module):
    """Pre-LN block: self-attention, feed-forward, LayerNorm; frames meet only in attention."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, dropout: float):
        super().__init__()
        self.mixer_norm = torch.nn.LayerNorm(d_model)
        self.mixer = RotarySelfAttention(d_model, nhead, dropout)
        self.mixer_dropout = torch.nn.Dropout(dropout)
        self.ffn = FeedForward(d_model, d_ffn, dropout)
        self.norm_out = torch.nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, context: Context, valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, **options) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); ``valid`` (B, T) marks real frames, ``lengths`` (B,) counts them."""
        x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), context, valid, lengths, **options))
        return self.norm_out(x + self.ffn(x))

    def forward_streaming(self, x: torch.Tensor, state: LayerState, context: Context,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk (B, C, D) -> (B, C, D), continuing the stream held in ``state``."""
        x = x + self.mixer.forward_streaming(self.mixer_norm(x), state.mixer, context, valid)
        return self.norm_out(x + self.ffn(x))


class CausalTransformerEncoder(AttentionEncoder):
    """Causal subsampling + Transformer blocks; same contract, contexts and streaming API as
    ``CausalConformerEncoder`` (frame ``t`` sees nothing after its chunk; bounded past).

    Arguments
    ---------
    n_mels, d_model, nhead, num_encoder_layers, d_ffn, subsampling_factor,
    subsampling_conv_channels, dropout, context, layer_left_contexts, activation_checkpointing :
        as for the Conformer.

    Example
    -------
    >>> encoder = CausalTransformerEncoder(d_model=32, nhead=2, num_encoder_layers=2, d_ffn=64,
    ...                                    subsampling_conv_channels=8)
    >>> encoder(torch.randn(2, 100, 80), context=[16, 0]).shape
    torch.Size([2, 25, 32])
    """

    def __init__(self, n_mels: int = 80, d_model: int = 144, nhead: int = 4,
                 num_encoder_layers: int = 12, d_ffn: int = 576, subsampling_factor: int = 4,
                 subsampling_conv_channels: int = 64, dropout: float = 0.1,
                 context: Context = (-1, -1), layer_left_contexts: Sequence[int] | None = None,
                 activation_checkpointing: bool = False):
        super().__init__(n_mels, d_model, num_encoder_layers, subsampling_factor,
                         subsampling_conv_channels, dropout, layer_left_contexts,
                         activation_checkpointing)
        self.layers.extend(TransformerBlock(d_model, nhead, d_ffn, dropout)
                           for _ in range(num_encoder_layers))
        self.set_context(context)
