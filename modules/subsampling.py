"""Causal convolutional subsampling of filterbank features."""
import math

import torch


class CausalConvSubsampling(torch.nn.Module):
    """Stride-2 Conv2d layers over (time, mel) that never look past the current group.

    Each layer pads one frame on the left of the time axis only, so its output ``j`` reads
    input frames ``2j - 1 .. 2j + 1``; after ``log2(s)`` layers, encoder frame ``t`` reads
    input frames up to ``(t + 1) * s - 1``, the last frame of its own group of ``s``.
    Input is zero-padded on the right to a multiple of ``s``: ``T' = ceil(T / s)``.

    Arguments
    ---------
    n_mels : input feature dimension.
    d_model : output dimension.
    subsampling_factor : 4 or 8.
    conv_channels : channels of the Conv2d layers.

    Example
    -------
    >>> sub = CausalConvSubsampling(n_mels=80, d_model=64, subsampling_factor=4, conv_channels=8)
    >>> sub(torch.randn(2, 101, 80))[0].shape
    torch.Size([2, 26, 64])
    """

    def __init__(self, n_mels: int = 80, d_model: int = 144, subsampling_factor: int = 4,
                 conv_channels: int = 64):
        super().__init__()
        if subsampling_factor not in (2, 4, 8):
            raise ValueError(f"subsampling_factor must be 2, 4 or 8, got {subsampling_factor}")
        self.subsampling_factor, self.n_mels = subsampling_factor, n_mels
        layers, channels, freq = [], 1, n_mels  # each layer: Conv2d + ReLU
        for _ in range(int(math.log2(subsampling_factor))):
            layers.append(torch.nn.Conv2d(channels, conv_channels, kernel_size=3, stride=2,
                                          padding=(0, 1)))
            channels, freq = conv_channels, (freq - 1) // 2 + 1
        self.conv = torch.nn.ModuleList(layers)
        self.out = torch.nn.Linear(conv_channels * freq, d_model)

    def forward(self, feats: torch.Tensor, cache: list | None = None
                ) -> tuple[torch.Tensor, list]:
        """(B, T, n_mels) -> (B, ceil(T / s), d_model) and the new cache.

        ``cache`` holds, per conv layer, its last input frame (B, C, 1, F) from the previous
        chunk (None: zeros, the start of the utterance). ``T`` of a chunk that continues a
        stream must be a multiple of ``s``.
        """
        s = self.subsampling_factor
        x = torch.nn.functional.pad(feats, (0, 0, 0, -feats.shape[1] % s)).unsqueeze(1)
        new_cache = []
        for index, conv in enumerate(self.conv):
            past = x.new_zeros(x[:, :, :1].shape) if cache is None else cache[index]
            x = torch.cat([past, x], dim=2)  # one past frame, no future
            new_cache.append(x[:, :, -1:])
            x = torch.relu(conv(x))
        batch, channels, frames, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, frames, channels * freq)), new_cache
