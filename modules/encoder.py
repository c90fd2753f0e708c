"""What the streaming encoders share: the macaron block, causal subsampling, lengths, streaming,
and the per-layer contexts of the attention encoders (Conformer, Transformer).

A block's *mixer* (self-attention for the Conformer, Mamba for ConMamba) is the only part that
looks across frames besides the causal convolution; it implements
``forward(x, context, valid, lengths, **options)`` (``context``: a pair, or a
``PiecewiseContext``) and ``forward_streaming(x, cache, context, valid)`` (``context``: a pair,
or one pair per stream of the batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence, Union

import torch
from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig
from torch.utils.checkpoint import checkpoint

from .context import Context, PiecewiseContext, context_from_dynchunk, validate_context
from .layers import CausalConvolutionModule, FeedForward
from .subsampling import CausalConvSubsampling


class MacaronBlock(torch.nn.Module):
    """FFN/2, mixer, causal convolution module, FFN/2, LayerNorm (pre-LN residuals)."""

    def __init__(self, d_model: int, d_ffn: int, kernel_size: int, dropout: float,
                 mixer: torch.nn.Module):
        super().__init__()
        self.ffn_in = FeedForward(d_model, d_ffn, dropout)
        self.mixer_norm = torch.nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mixer_dropout = torch.nn.Dropout(dropout)
        self.conv = CausalConvolutionModule(d_model, kernel_size, dropout)
        self.ffn_out = FeedForward(d_model, d_ffn, dropout)
        self.norm_out = torch.nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, context: Context, valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, **options) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); ``valid`` (B, T) marks real frames, ``lengths`` (B,) counts them."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), context, valid, lengths, **options))
        x = x + self.conv(x, valid)[0]
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)

    def forward_streaming(self, x: torch.Tensor, state: "LayerState", context: Context,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk (B, C, D) -> (B, C, D), continuing the stream held in ``state``; ``valid``
        (B, C) marks the frames that belong to each stream (None: all)."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.mixer.forward_streaming(self.mixer_norm(x), state.mixer, context, valid)
        conv_out, state.conv = self.conv(x, valid, cache=state.conv)
        x = x + conv_out
        x = x + 0.5 * self.ffn_out(x)
        return self.norm_out(x)


@dataclass
class LayerState:
    """Streaming caches of one block: the mixer's (a dict it fills) and the convolution's frames."""

    mixer: dict = field(default_factory=dict)
    conv: torch.Tensor | None = None


StreamContext = Union[Context, tuple[Context, ...]]  # one pair, or one per stream of a batch


def per_stream(context: StreamContext) -> tuple[Context, ...]:
    """A pair or per-stream pairs -> per-stream pairs (one pair: every stream)."""
    return (context,) if isinstance(context[0], int) else tuple(context)


@dataclass
class StreamingState:
    """Everything ``forward_streaming`` carries from one chunk to the next (bounded in size).

    ``context``: the pair in force (or one pair per stream); ``max_left``: the largest left
    context a ``switch_context`` may ask for (None: the stream keeps its context).
    """

    context: StreamContext
    layer_contexts: list[StreamContext]
    layers: list[LayerState]
    subsampling: list | None = None
    finished: bool = False
    max_left: int | None = None


class StreamingEncoder(torch.nn.Module):
    """Causal subsampling + macaron blocks, offline and chunk by chunk.

    Subclasses fill ``self.layers`` and may refine ``check_context``, ``layer_contexts``,
    ``narrowest_context`` and ``check_streamable``.

    ``activation_checkpointing``: in training with gradients enabled, ``forward`` keeps only each
    block's input and recomputes the block in the backward pass (less memory on long utterances,
    more compute); outputs and gradients are unchanged, dropout included (the RNG state is
    replayed). Inference and ``forward_streaming`` never checkpoint.
    """

    def __init__(self, n_mels: int, d_model: int, subsampling_factor: int,
                 subsampling_conv_channels: int, dropout: float,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.subsampling_factor = subsampling_factor
        self.d_model = d_model
        self.subsampling = CausalConvSubsampling(n_mels, d_model, subsampling_factor,
                                                 subsampling_conv_channels)
        self.input_dropout = torch.nn.Dropout(dropout)
        self.layers = torch.nn.ModuleList()
        self.context: Context = (-1, -1)

    @property
    def frame_seconds(self) -> float:
        """Duration of one encoder frame (10 ms feature hop)."""
        return 0.01 * self.subsampling_factor

    def check_context(self, context: Context) -> Context:
        """Validates a ``[left, right]`` pair for this encoder."""
        return validate_context(context)

    def _checked(self, context: Context | PiecewiseContext) -> Context | PiecewiseContext:
        """``check_context`` of a pair, or of every pair of a piecewise context."""
        if isinstance(context, PiecewiseContext):
            return context.map(self.check_context)
        return self.check_context(context)

    def set_context(self, context: Context) -> None:
        """Fixes the context used when ``forward`` is called without one."""
        self.context = self.check_context(context)

    def layer_contexts(self, context: Context | PiecewiseContext) -> list:
        """The context each layer applies under ``context``."""
        return [self._checked(context)] * len(self.layers)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                context: Context | None = None, num_layers: int | None = None,
                all_layers: bool = False, **options) -> torch.Tensor | list[torch.Tensor]:
        """Encodes features.

        Arguments
        ---------
        feats : (B, T, n_mels) normalized features.
        lengths : (B,) relative lengths in (0, 1] (SpeechBrain convention); None = all full.
        context : ``[left, right]`` in encoder frames; None = the fixed context; a
            ``PiecewiseContext``: contexts that change from chunk to chunk (the reference of a
            switched stream: dense masks, a scan per chunk; slow).
        num_layers : run the first ``num_layers`` blocks only (e.g. to probe a middle layer);
            None: all of them.
        all_layers : return every block's output (the downstream layer sum), not only the last.
        options : passed to every block's mixer (e.g. ``banded=False`` for the Conformer).

        Returns
        -------
        (B, ceil(T / s), d_model) encoder frames (a list of them, one per block, with
        ``all_layers``). Frames past an utterance's end are padding.
        """
        context = self.context if context is None else self._checked(context)
        if num_layers is not None and not 1 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers (probe_layer) must be in 1..{len(self.layers)}, "
                             f"got {num_layers}")
        valid = enc_lengths = None
        if lengths is not None:
            abs_lengths = torch.round(lengths * feats.shape[1]).long()
            valid_in = torch.arange(feats.shape[1], device=feats.device)[None] < abs_lengths[:, None]
            feats = feats.masked_fill(~valid_in[..., None], 0.0)
        x = self.input_dropout(self.subsampling(feats)[0])
        if lengths is not None:
            enc_lengths = -(-abs_lengths // self.subsampling_factor)
            valid = torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]
        # Without a graph to build there are no activations to save: no recomputation.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        outputs = []
        for layer, layer_context in zip(self.layers[:num_layers], self.layer_contexts(context)):
            if recompute:
                # Everything but x bound by partial, so that checkpoint's own keywords can never
                # swallow an option; preserve_rng_state replays the dropout masks.
                block = partial(layer, context=layer_context, valid=valid, lengths=enc_lengths,
                                **options)
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True)
            else:
                x = layer(x, layer_context, valid, enc_lengths, **options)
            outputs.append(x)
        return outputs if all_layers else x

    def check_streamable(self, context: Context, layer_contexts: list[Context]) -> None:
        """Raises a clear error when ``context`` cannot be streamed with bounded caches."""
        if context[1] == -1:
            raise ValueError(f"context {list(context)} is offline (right = -1): it has no chunks "
                             "to stream; use a finite pair such as [32, 3]")

    def make_streaming_context(self, context: Context | DynChunkTrainConfig | None = None,
                               max_left: int | None = None) -> StreamingState:
        """A fresh stream for ``forward_streaming`` under ``context`` (None: the fixed one; a
        SpeechBrain ``DynChunkTrainConfig`` is mapped by ``context_from_dynchunk``).

        ``max_left``: the stream may later ``switch_context`` to any context whose left is at
        most ``max_left`` frames; its caches keep that many frames (per layer, at most the
        layer's cap). None: the stream keeps ``context``.
        """
        if isinstance(context, DynChunkTrainConfig):
            context = context_from_dynchunk(context)
        context = self.context if context is None else self.check_context(context)
        layer_contexts = self.layer_contexts(context)
        self.check_streamable(context, layer_contexts)
        layers = [LayerState() for _ in self.layers]
        if max_left is not None:
            if isinstance(max_left, bool) or not isinstance(max_left, int) or max_left < 0:
                raise ValueError(f"max_left must be an int >= 0 (encoder frames), got {max_left!r}")
            for layer, (layer_max, _) in zip(layers, self.layer_contexts((max_left, 0))):
                layer.mixer["max_left"] = layer_max
        state = StreamingState(context, layer_contexts, layers, max_left=max_left)
        if max_left is not None:
            self.switch_context(state, context)  # checks the first context against max_left
        return state

    def switch_context(self, state: StreamingState, context: StreamContext) -> None:
        """Changes the context of a stream from its next chunk on (one pair, or one pair per
        stream of the batch, all with the same chunk size ``right + 1``).

        The stream then computes exactly ``forward`` under the ``PiecewiseContext`` of the
        contexts each chunk ran under. Raises unless the stream was started with a ``max_left``
        and every left is finite and at most it.
        """
        if state.max_left is None:
            raise ValueError("this stream keeps its context: start it with "
                             "make_streaming_context(context, max_left=...) to switch")
        rows = tuple(self.check_context(c) for c in per_stream(context))
        if len({right for _, right in rows}) != 1:
            raise ValueError(f"streams of one batch share their chunk size: contexts {list(rows)} "
                             "have different right values; batch streams with equal chunks")
        for row in rows:
            self.check_streamable(row, self.layer_contexts(row))
            if row[0] == -1:
                raise ValueError(f"context {list(row)} keeps all the past (left = -1): a stream "
                                 "that switches needs finite left contexts")
            if row[0] > state.max_left:
                raise ValueError(f"context {list(row)}: left must be within the stream's "
                                 f"max_left ({state.max_left} frames, fixed when it started; "
                                 "its caches keep no more)")
        if state.subsampling is not None and len(rows) > 1 and (
                len(rows) != state.subsampling[0].shape[0]):
            raise ValueError(f"{len(rows)} contexts for a batch of "
                             f"{state.subsampling[0].shape[0]} streams")
        state.context = rows[0] if len(set(rows)) == 1 else rows
        per_layer = [self.layer_contexts(row) for row in rows]  # [stream][layer]
        state.layer_contexts = [layer[0] if len(set(layer)) == 1 else tuple(layer)
                                for layer in zip(*per_layer)]

    def chunk_frames(self, state: StreamingState) -> int:
        """Input feature frames per chunk: ``(right + 1) * s``."""
        return (per_stream(state.context)[0][1] + 1) * self.subsampling_factor

    def forward_streaming(self, feats: torch.Tensor, state: StreamingState,
                          lengths: torch.Tensor | None = None,
                          all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Encodes the next chunk of a stream (or of B streams side by side).

        Arguments
        ---------
        feats : (B, chunk_frames, n_mels) normalized features; the last chunk of a stream may
            be shorter (it is padded like the offline input, and ends the stream).
        state : from ``make_streaming_context``; updated in place.
        lengths : (B,) how many of the chunk's feature frames belong to each stream; the rest is
            padding (a shorter utterance that ended in a batch of streams), masked as the
            offline ``lengths`` mask it. None: all of them.
        all_layers : return every block's output (the downstream layer sum), not only the last.

        Returns
        -------
        (B, right + 1, d_model) encoder frames (fewer for a short last chunk): the frames that
        this chunk completes, equal to the offline output under the same context (on each
        stream's own frames); a list of them, one per block, with ``all_layers``.
        """
        expected = self.chunk_frames(state)
        rows = len(per_stream(state.context))
        if rows > 1 and rows != feats.shape[0]:
            raise ValueError(f"the stream has {rows} per-stream contexts for a batch of "
                             f"{feats.shape[0]} streams")
        if state.finished:
            raise ValueError("this stream has ended (its last chunk was shorter): "
                             "start a new one with make_streaming_context()")
        if not 0 < feats.shape[1] <= expected:
            raise ValueError(f"a chunk has {expected} feature frames ((right + 1) x s for context "
                             f"{list(state.context)}), got {feats.shape[1]}")
        state.finished = feats.shape[1] < expected
        valid = None
        if lengths is not None:
            frames = torch.arange(feats.shape[1], device=feats.device)
            feats = feats.masked_fill((frames[None] >= lengths[:, None])[..., None], 0.0)
        x, state.subsampling = self.subsampling(feats, state.subsampling)
        if lengths is not None:
            enc_lengths = -(-lengths // self.subsampling_factor)
            valid = torch.arange(x.shape[1], device=x.device)[None] < enc_lengths[:, None]
        outputs = []
        for layer, layer_state, context in zip(self.layers, state.layers, state.layer_contexts):
            x = layer.forward_streaming(x, layer_state, context, valid)
            outputs.append(x)
        return outputs if all_layers else x

    def encode_in_chunks(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                         context: Context | None = None) -> torch.Tensor:
        """``forward``, computed the streaming way: each row of ``feats`` is its own stream, fed
        chunk by chunk (``lengths``: relative, as for ``forward``; None: all full).

        Returns
        -------
        (B, ceil(T / s), d_model), equal to ``forward(feats, lengths, context)`` on each
        stream's own frames.
        """
        state = self.make_streaming_context(context)
        size = self.chunk_frames(state)
        frames = None if lengths is None else torch.round(lengths * feats.shape[1]).long()
        outputs = []
        for start in range(0, feats.shape[1], size):
            chunk_lengths = None if frames is None else (frames - start).clamp(0, size)
            outputs.append(self.forward_streaming(feats[:, start:start + size], state,
                                                  chunk_lengths))
        return torch.cat(outputs, dim=1)


class AttentionEncoder(StreamingEncoder):
    """A streaming encoder whose blocks mix frames with chunked limited-context self-attention.

    Subclasses fill ``self.layers`` with blocks built around ``RotarySelfAttention``.
    ``layer_left_contexts``: optional per-layer cap on the left context (encoder frames), e.g.
    growing across layers; layer ``i`` uses ``min(left, layer_left_contexts[i])`` (the cap alone
    when ``left = -1``). The offline context ``[-1, -1]`` is never capped.
    """

    def __init__(self, n_mels: int, d_model: int, num_encoder_layers: int,
                 subsampling_factor: int, subsampling_conv_channels: int, dropout: float,
                 layer_left_contexts: Sequence[int] | None, activation_checkpointing: bool = False):
        super().__init__(n_mels, d_model, subsampling_factor, subsampling_conv_channels, dropout,
                         activation_checkpointing)
        if layer_left_contexts is not None and (
                len(layer_left_contexts) != num_encoder_layers
                or any(int(v) < 0 for v in layer_left_contexts)):
            raise ValueError(f"layer_left_contexts needs {num_encoder_layers} values >= 0, "
                             f"got {layer_left_contexts}")
        self.layer_left_contexts = None if layer_left_contexts is None else [
            int(v) for v in layer_left_contexts]

    def layer_contexts(self, context: Context | PiecewiseContext) -> list:
        """The context each layer applies under ``context`` (per-layer caps included)."""
        if isinstance(context, PiecewiseContext):
            if self.layer_left_contexts is None:
                return [context] * len(self.layers)
            return [context.map(lambda c, cap=cap: _capped(c, cap))
                    for cap in self.layer_left_contexts]
        context = validate_context(context)
        if self.layer_left_contexts is None:
            return [context] * len(self.layers)
        return [_capped(context, cap) for cap in self.layer_left_contexts]

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


def _capped(context: Context, cap: int) -> Context:
    """``context`` with its left limited to ``cap`` (the offline ``[-1, -1]`` is never capped)."""
    left, right = context
    if right == -1:
        return context
    return (cap if left == -1 else min(left, cap), right)
