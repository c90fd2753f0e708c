"""ConMamba encoder: the Conformer block with self-attention replaced by a Mamba layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .context import Context, validate_context
from .layers import CausalConvolutionModule, FeedForward
from .mamba import Mamba
from .subsampling import CausalConvSubsampling


def _reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverses each (B, T, D) sequence over its own valid frames; padding stays in place."""
    frames = torch.arange(x.shape[1], device=x.device)
    if lengths is None:
        return x.flip(1)
    index = torch.where(frames[None] < lengths[:, None], lengths[:, None] - 1 - frames[None],
                        frames[None])
    return x.gather(1, index[..., None].expand_as(x))


class ConMambaBlock(torch.nn.Module):
    """FFN/2, Mamba (uni- or bidirectional), causal convolution module, FFN/2, LayerNorm."""

    def __init__(self, d_model: int, d_ffn: int, kernel_size: int, dropout: float,
                 d_state: int, d_conv: int, expand: int, bidirectional: bool):
        super().__init__()
        self.ffn_in = FeedForward(d_model, d_ffn, dropout)
        self.mamba_norm = torch.nn.LayerNorm(d_model)
        self.mamba = Mamba(d_model, d_state, d_conv, expand)
        self.mamba_backward = Mamba(d_model, d_state, d_conv, expand) if bidirectional else None
        self.mamba_dropout = torch.nn.Dropout(dropout)
        self.conv = CausalConvolutionModule(d_model, kernel_size, dropout)
        self.ffn_out = FeedForward(d_model, d_ffn, dropout)
        self.norm_out = torch.nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, context: Context, valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); ``lengths`` (B,) in frames, used by the backward direction."""
        x = x + 0.5 * self.ffn_in(x)
        h = self.mamba_norm(x)
        y = self.mamba(h, context)
        if self.mamba_backward is not None:
            y = y + _reverse_within_lengths(
                self.mamba_backward(_reverse_within_lengths(h, lengths)), lengths)
        x = x + self.mamba_dropout(y)
        x = x + self.conv(x, valid)[0]
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)

    def forward_streaming(self, x: torch.Tensor, state: "ConMambaLayerState",
                          context: Context) -> torch.Tensor:
        """One chunk (B, C, D) -> (B, C, D)."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.mamba.forward_streaming(self.mamba_norm(x), state.mamba, context)
        conv_out, state.conv = self.conv(x, cache=state.conv)
        x = x + conv_out
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)


@dataclass
class ConMambaLayerState:
    """Streaming caches of one block: Mamba (conv frames + SSM window or state), conv module."""

    mamba: dict = field(default_factory=dict)
    conv: torch.Tensor | None = None


@dataclass
class ConMambaStreamingState:
    """What ``forward_streaming`` carries between chunks; bounded for every finite-chunk context."""

    context: Context
    subsampling: list | None = None
    layers: list[ConMambaLayerState] = field(default_factory=list)
    finished: bool = False


class ConMambaEncoder(torch.nn.Module):
    """Causal subsampling + ConMamba blocks; same contract as ``CausalConformerEncoder``.

    Under ``[left, right]`` each Mamba layer scans every chunk from a zero state ``left`` frames
    before the chunk start (``left = -1``: all the past), so encoder frame ``t`` never depends on
    input after its own group of ``s`` input frames (stricter than attention, which sees its whole
    chunk). ``bidirectional`` adds a backward Mamba per block for offline ablations: it needs the
    offline context ``[-1, -1]`` and refuses streaming.

    Arguments
    ---------
    n_mels, d_model, num_encoder_layers, d_ffn, kernel_size, subsampling_factor,
    subsampling_conv_channels, dropout, context : as for the Conformer.
    d_state, d_conv, expand : Mamba sizes.
    bidirectional : offline bidirectional variant.

    Example
    -------
    >>> encoder = ConMambaEncoder(d_model=32, num_encoder_layers=2, d_ffn=64,
    ...                           subsampling_conv_channels=8)
    >>> encoder(torch.randn(2, 100, 80), context=[8, 1]).shape
    torch.Size([2, 25, 32])
    """

    def __init__(self, n_mels: int = 80, d_model: int = 144, num_encoder_layers: int = 12,
                 d_ffn: int = 576, kernel_size: int = 15, subsampling_factor: int = 4,
                 subsampling_conv_channels: int = 64, dropout: float = 0.1,
                 context: Context = (-1, -1), d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, bidirectional: bool = False):
        super().__init__()
        self.subsampling_factor = subsampling_factor
        self.d_model = d_model
        self.bidirectional = bidirectional
        self.subsampling = CausalConvSubsampling(n_mels, d_model, subsampling_factor,
                                                 subsampling_conv_channels)
        self.input_dropout = torch.nn.Dropout(dropout)
        self.layers = torch.nn.ModuleList(
            ConMambaBlock(d_model, d_ffn, kernel_size, dropout, d_state, d_conv, expand,
                          bidirectional) for _ in range(num_encoder_layers))
        self.context = self._check(context)

    @property
    def frame_seconds(self) -> float:
        return 0.01 * self.subsampling_factor

    def _check(self, context: Context) -> Context:
        context = validate_context(context)
        if self.bidirectional and context != (-1, -1):
            raise ValueError(f"the bidirectional ConMamba is offline only: context {list(context)} "
                             "given; use [-1, -1] (preset 'unlimited') or bidirectional: False")
        return context

    def set_context(self, context: Context) -> None:
        """Fixes the context used when ``forward`` is called without one."""
        self.context = self._check(context)

    def narrowest_context(self, context: Context) -> Context:
        """Window the masker must respect: frame ``t`` reaches ``[t - left, t]`` at least."""
        left, _ = self._check(context)
        return (-1, -1) if self.bidirectional else (left, 0)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                context: Context | None = None) -> torch.Tensor:
        """(B, T, n_mels) -> (B, ceil(T / s), d_model); ``lengths`` relative, as SpeechBrain."""
        context = self.context if context is None else self._check(context)
        valid = enc_lengths = None
        if lengths is not None:
            abs_lengths = torch.round(lengths * feats.shape[1]).long()
            valid_in = torch.arange(feats.shape[1], device=feats.device)[None] < abs_lengths[:, None]
            feats = feats.masked_fill(~valid_in[..., None], 0.0)
        x = self.input_dropout(self.subsampling(feats)[0])
        if lengths is not None:
            enc_lengths = -(-abs_lengths // self.subsampling_factor)
            valid = torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]
        for layer in self.layers:
            x = layer(x, context, valid, enc_lengths)
        return x

    def make_streaming_context(self, context: Context | None = None) -> ConMambaStreamingState:
        """A fresh stream; ``[-1, R]`` streams too (the SSM state is a fixed-size summary)."""
        if self.bidirectional:
            raise ValueError("the bidirectional ConMamba cannot stream: its backward Mamba needs "
                             "the whole utterance; train with bidirectional: False to stream")
        context = self.context if context is None else self._check(context)
        if context[1] == -1:
            raise ValueError(f"context {list(context)} has no chunks to stream; use a finite "
                             "right context such as [-1, 3] or [32, 3]")
        return ConMambaStreamingState(context, layers=[ConMambaLayerState() for _ in self.layers])

    def chunk_frames(self, state: ConMambaStreamingState) -> int:
        """Input feature frames per chunk: ``(right + 1) * s``."""
        return (state.context[1] + 1) * self.subsampling_factor

    def forward_streaming(self, feats: torch.Tensor, state: ConMambaStreamingState) -> torch.Tensor:
        """Next chunk (B, chunk_frames, n_mels) -> (B, right + 1, d_model); a shorter chunk ends it."""
        expected = self.chunk_frames(state)
        if state.finished:
            raise ValueError("this stream has ended (its last chunk was shorter): "
                             "start a new one with make_streaming_context()")
        if not 0 < feats.shape[1] <= expected:
            raise ValueError(f"a chunk has {expected} feature frames ((right + 1) x s for context "
                             f"{list(state.context)}), got {feats.shape[1]}")
        state.finished = feats.shape[1] < expected
        x, state.subsampling = self.subsampling(feats, state.subsampling)
        for layer, layer_state in zip(self.layers, state.layers):
            x = layer.forward_streaming(x, layer_state, state.context)
        return x
