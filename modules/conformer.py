"""Causal Conformer encoder with chunked, limited-context self-attention and exact streaming."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import RotarySelfAttention
from .context import Context, validate_context
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

    def forward(self, x: torch.Tensor, context: Context, valid: torch.Tensor | None = None,
                banded: bool = True) -> torch.Tensor:
        """(B, T, D) -> (B, T, D) under ``context``; ``valid`` (B, T) marks real frames."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.attn_dropout(self.attention(self.attn_norm(x), context, valid, banded))
        x = x + self.conv(x, valid)[0]
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)

    def forward_streaming(self, x: torch.Tensor, state: "LayerState", left: int) -> torch.Tensor:
        """One chunk (B, C, D) -> (B, C, D), continuing the stream held in ``state``."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.attention.forward_streaming(self.attn_norm(x), state.attention, left)
        conv_out, state.conv = self.conv(x, cache=state.conv)
        x = x + conv_out
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)


@dataclass
class LayerState:
    """Streaming caches of one block: attention keys / values and convolution frames."""

    attention: dict = field(default_factory=lambda: {"position": 0, "k": None, "v": None})
    conv: torch.Tensor | None = None


@dataclass
class StreamingState:
    """Everything ``forward_streaming`` carries from one chunk to the next.

    Sizes are bounded by the context: per layer at most ``left`` keys and values and
    ``kernel_size - 1`` convolution frames, plus one input frame per subsampling layer.
    """

    context: Context
    layer_contexts: list[Context]
    subsampling: list | None = None
    layers: list[LayerState] = field(default_factory=list)
    finished: bool = False


class CausalConformerEncoder(torch.nn.Module):
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
        layer_left_contexts: Sequence[int] | None = None,
    ):
        super().__init__()
        if layer_left_contexts is not None and (
                len(layer_left_contexts) != num_encoder_layers
                or any(int(v) < 0 for v in layer_left_contexts)):
            raise ValueError(f"layer_left_contexts needs {num_encoder_layers} values >= 0, "
                             f"got {layer_left_contexts}")
        self.subsampling_factor = subsampling_factor
        self.d_model = d_model
        self.layer_left_contexts = None if layer_left_contexts is None else [
            int(v) for v in layer_left_contexts]
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

    def layer_contexts(self, context: Context) -> list[Context]:
        """The context each layer applies under ``context`` (per-layer caps included)."""
        left, right = validate_context(context)
        if self.layer_left_contexts is None or right == -1:
            return [(left, right)] * len(self.layers)
        return [(cap if left == -1 else min(left, cap), right) for cap in self.layer_left_contexts]

    def narrowest_context(self, context: Context) -> Context:
        """The layer context with the smallest left window: what the masker must respect."""
        return min(self.layer_contexts(context), key=lambda c: float("inf") if c[0] == -1 else c[0])

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                context: Context | None = None, banded: bool = True) -> torch.Tensor:
        """Encodes features.

        Arguments
        ---------
        feats : (B, T, n_mels) normalized features.
        lengths : (B,) relative lengths in (0, 1] (SpeechBrain convention); None = all full.
        context : ``[left, right]`` in encoder frames; None = the fixed context.
        banded : False forces the dense T x T attention (reference for tests and benchmarks).

        Returns
        -------
        (B, ceil(T / s), d_model) encoder frames. Frames past an utterance's end are padding.
        """
        context = self.context if context is None else validate_context(context)
        valid = None
        if lengths is not None:
            abs_lengths = torch.round(lengths * feats.shape[1]).long()
            valid_in = torch.arange(feats.shape[1], device=feats.device)[None] < abs_lengths[:, None]
            feats = feats.masked_fill(~valid_in[..., None], 0.0)
        x = self.input_dropout(self.subsampling(feats)[0])
        if lengths is not None:
            enc_lengths = -(-abs_lengths // self.subsampling_factor)
            valid = torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]
        for layer, layer_context in zip(self.layers, self.layer_contexts(context)):
            x = layer(x, layer_context, valid, banded)
        return x

    def make_streaming_context(self, context: Context | None = None) -> StreamingState:
        """A fresh stream for ``forward_streaming`` under ``context`` (None: the fixed one).

        Streaming needs a finite window: ``left = -1`` (all the past) would need a cache that
        grows with the stream, and ``right = -1`` (offline) has no chunks; both are refused.
        """
        context = self.context if context is None else validate_context(context)
        layer_contexts = self.layer_contexts(context)
        if context[1] == -1 or any(left == -1 for left, _ in layer_contexts):
            raise ValueError(
                f"context {list(context)} cannot be streamed with a bounded cache: left = -1 keeps "
                "all the past and right = -1 is offline; use a finite pair such as [32, 3] "
                "(or per-layer caps, layer_left_contexts)")
        return StreamingState(context, layer_contexts,
                              layers=[LayerState() for _ in self.layers])

    def chunk_frames(self, state: StreamingState) -> int:
        """Input feature frames per chunk: ``(right + 1) * s``."""
        return (state.context[1] + 1) * self.subsampling_factor

    def forward_streaming(self, feats: torch.Tensor, state: StreamingState) -> torch.Tensor:
        """Encodes the next chunk of a stream.

        Arguments
        ---------
        feats : (B, chunk_frames, n_mels) normalized features; the last chunk of a stream may
            be shorter (it is padded like the offline input, and ends the stream).
        state : from ``make_streaming_context``; updated in place.

        Returns
        -------
        (B, right + 1, d_model) encoder frames (fewer for a short last chunk): the frames that
        this chunk completes, equal to the offline output under the same context.
        """
        expected = self.chunk_frames(state)
        if state.finished:
            raise ValueError("this stream has ended (its last chunk was shorter): "
                             "start a new one with make_streaming_context()")
        if not 0 < feats.shape[1] <= expected:
            raise ValueError(f"a chunk has {expected} feature frames ((right + 1) x s for context "
                             f"{list(state.context)}), got {feats.shape[1]}")
        state.finished = feats.shape[1] < expected
        x, state.subsampling = self.subsampling(feats, state.subsampling)
        for layer, layer_state, (left, _) in zip(self.layers, state.layers, state.layer_contexts):
            x = layer.forward_streaming(x, layer_state, left)
        return x
