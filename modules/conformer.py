"""Causal Conformer encoder with chunked, limited-context self-attention."""
from __future__ import annotations

import torch

from .attention import RotarySelfAttention
from .context import Context, chunk_attention_mask, validate_context
from .layers import CausalConvolutionModule, FeedForward
from .subsampling import CausalConvSubsampling


class ConformerBlock(torch.nn.Module):
    """Macaron Conformer block: FFN/2, self-attention, causal convolution, FFN/2, LayerNorm."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, kernel_size: int, dropout: float):
        super().__init__()
        self.ffn_in = FeedForward(d_model, d_ffn, dropout)
        self.attn_norm = torch.nn.LayerNorm(d_model)
        self.attention = RotarySelfAttention(d_model, nhead, dropout)
        self.attn_dropout = torch.nn.Dropout(dropout)
        self.conv = CausalConvolutionModule(d_model, kernel_size, dropout)
        self.ffn_out = FeedForward(d_model, d_ffn, dropout)
        self.norm_out = torch.nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                valid: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.attn_dropout(self.attention(self.attn_norm(x), attn_mask))
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)


class CausalConformerEncoder(torch.nn.Module):
    """Streaming Conformer: causal subsampling + blocks with chunked limited-context attention.

    Encoder frame ``t`` never depends on input after the end of its chunk: the subsampling
    reads no frame past its own group, attention stops at the chunk end, and the depthwise
    convolutions are causal. With ``[-1, -1]`` attention is full (offline).

    Arguments
    ---------
    n_mels : input feature dimension.
    d_model, nhead, num_encoder_layers, d_ffn, kernel_size : Conformer sizes.
    subsampling_factor : input frames per encoder frame (4 or 8).
    subsampling_conv_channels : channels of the subsampling convolutions.
    dropout : dropout rate.
    context : default ``[left, right]`` context in encoder frames (see ``set_context``).

    Example
    -------
    >>> encoder = CausalConformerEncoder(n_mels=80, d_model=32, nhead=2, num_encoder_layers=2,
    ...                                  d_ffn=64, subsampling_conv_channels=8)
    >>> encoder(torch.randn(2, 100, 80), context=[16, 0]).shape
    torch.Size([2, 25, 32])
    """

    def __init__(
        self,
        n_mels: int = 80,
        d_model: int = 144,
        nhead: int = 4,
        num_encoder_layers: int = 12,
        d_ffn: int = 576,
        kernel_size: int = 15,
        subsampling_factor: int = 4,
        subsampling_conv_channels: int = 64,
        dropout: float = 0.1,
        context: Context = (-1, -1),
    ):
        super().__init__()
        self.subsampling_factor = subsampling_factor
        self.d_model = d_model
        self.subsampling = CausalConvSubsampling(n_mels, d_model, subsampling_factor,
                                                 subsampling_conv_channels)
        self.input_dropout = torch.nn.Dropout(dropout)
        self.layers = torch.nn.ModuleList(
            ConformerBlock(d_model, nhead, d_ffn, kernel_size, dropout)
            for _ in range(num_encoder_layers))
        self.context = validate_context(context)

    @property
    def frame_seconds(self) -> float:
        """Duration of one encoder frame (10 ms feature hop)."""
        return 0.01 * self.subsampling_factor

    def set_context(self, context: Context) -> None:
        """Fixes the context used when ``forward`` is called without one."""
        self.context = validate_context(context)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                context: Context | None = None) -> torch.Tensor:
        """Encodes features.

        Arguments
        ---------
        feats : (B, T, n_mels) normalized features.
        lengths : (B,) relative lengths in (0, 1] (SpeechBrain convention); None = all full.
        context : ``[left, right]`` in encoder frames; None = the fixed context.

        Returns
        -------
        (B, ceil(T / s), d_model) encoder frames. Frames past an utterance's end are padding.
        """
        context = self.context if context is None else validate_context(context)
        valid_in, valid = None, None
        if lengths is not None:
            abs_lengths = torch.round(lengths * feats.shape[1]).long()
            valid_in = torch.arange(feats.shape[1], device=feats.device)[None] < abs_lengths[:, None]
            feats = feats.masked_fill(~valid_in[..., None], 0.0)
        x = self.input_dropout(self.subsampling(feats))
        frames = x.shape[1]
        if valid_in is not None:
            enc_lengths = -(-abs_lengths // self.subsampling_factor)
            valid = torch.arange(frames, device=x.device)[None] < enc_lengths[:, None]
        attn_mask = self._attention_mask(frames, context, valid, x.device)
        for layer in self.layers:
            x = layer(x, attn_mask, valid)
        return x

    @staticmethod
    def _attention_mask(frames: int, context: Context, valid: torch.Tensor | None,
                        device) -> torch.Tensor | None:
        """(B or 1, 1, T, T) mask: the chunk window, minus padded keys (a frame keeps itself)."""
        if context == (-1, -1) and (valid is None or bool(valid.all())):
            return None  # full attention: PyTorch's fused kernel, no mask
        mask = chunk_attention_mask(frames, context, device)[None]
        if valid is not None:
            itself = torch.eye(frames, dtype=torch.bool, device=device)
            mask = mask & (valid[:, None, :] | itself)
        return mask[:, None]
