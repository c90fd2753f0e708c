"""ConMamba encoder: the Conformer block with self-attention replaced by a Mamba layer."""
from __future__ import annotations

import torch

from .context import Context, validate_context
from .encoder import MacaronBlock, StreamingEncoder
from .mamba import Mamba


def _reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverses each (B, T, D) sequence over its own valid frames; padding stays in place."""
    frames = torch.arange(x.shape[1], device=x.device)
    if lengths is None:
        return x.flip(1)
    index = torch.where(frames[None] < lengths[:, None], lengths[:, None] - 1 - frames[None],
                        frames[None])
    return x.gather(1, index[..., None].expand_as(x))


class BidirectionalMamba(torch.nn.Module):
    """A forward and a backward Mamba, summed (offline only)."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, scan_backend: str):
        super().__init__()
        self.forward_mamba = Mamba(d_model, d_state, d_conv, expand, scan_backend=scan_backend)
        self.backward_mamba = Mamba(d_model, d_state, d_conv, expand, scan_backend=scan_backend)

    def forward(self, x, context, valid=None, lengths=None):
        """(B, T, D) -> (B, T, D); each utterance is reversed within its ``lengths``."""
        backward = self.backward_mamba(_reverse_within_lengths(x, lengths), context)
        return self.forward_mamba(x, context) + _reverse_within_lengths(backward, lengths)


class ConMambaEncoder(StreamingEncoder):
    """Causal subsampling + ConMamba blocks; same contract as ``CausalConformerEncoder``.

    Under ``[left, right]`` each Mamba layer scans every chunk from a zero state ``left`` frames
    before the chunk start (``left = -1``: all the past), so encoder frame ``t`` never depends on
    input after its own group of ``s`` input frames (stricter than attention, which sees its whole
    chunk). ``bidirectional`` adds a backward Mamba per block for offline ablations: it needs the
    offline context ``[-1, -1]`` and refuses streaming.

    Arguments
    ---------
    n_mels, d_model, num_encoder_layers, d_ffn, kernel_size, subsampling_factor,
    subsampling_conv_channels, dropout, context, activation_checkpointing : as for the Conformer.
    d_state, d_conv, expand : Mamba sizes.
    bidirectional : offline bidirectional variant.
    scan_backend : "auto" | "fused" | "compiled" | "chunked", see ``modules.mamba.Mamba``.

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
                 expand: int = 2, bidirectional: bool = False, scan_backend: str = "auto",
                 activation_checkpointing: bool = False):
        super().__init__(n_mels, d_model, subsampling_factor, subsampling_conv_channels, dropout,
                         activation_checkpointing)
        self.bidirectional = bidirectional
        mixer = BidirectionalMamba if bidirectional else Mamba
        self.layers.extend(
            MacaronBlock(d_model, d_ffn, kernel_size, dropout,
                         mixer(d_model, d_state, d_conv, expand, scan_backend=scan_backend))
            for _ in range(num_encoder_layers))
        self.set_context(context)

    def check_context(self, context: Context) -> Context:
        context = validate_context(context)
        if self.bidirectional and context != (-1, -1):
            raise ValueError(f"the bidirectional ConMamba is offline only: context {list(context)} "
                             "given; use [-1, -1] (preset 'unlimited') or bidirectional: False")
        return context

    def narrowest_context(self, context: Context) -> Context:
        """Window the masker must respect: frame ``t`` reaches ``[t - left, t]`` at least."""
        left, _ = self.check_context(context)
        return (-1, -1) if self.bidirectional else (left, 0)

    def check_streamable(self, context: Context, layer_contexts: list[Context]) -> None:
        """``[-1, R]`` streams (the SSM state is a fixed-size summary); bidirectional never."""
        if self.bidirectional:
            raise ValueError("the bidirectional ConMamba cannot stream: its backward Mamba needs "
                             "the whole utterance; train with bidirectional: False to stream")
        super().check_streamable(context, layer_contexts)
