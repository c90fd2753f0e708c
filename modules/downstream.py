"""Downstream heads on a (frozen or fine-tuned) streaming encoder: the SUPERB-style learnable
weighted sum of its layers and an utterance classifier (keyword spotting, intent)."""
from __future__ import annotations

import torch


class WeightedLayerSum(torch.nn.Module):
    """A softmax-weighted sum of the encoder's layer outputs (SUPERB): the downstream task
    picks the layers it needs; the weights start equal.

    Example
    -------
    >>> layer_sum = WeightedLayerSum(3)
    >>> layer_sum([torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)])[0, 0, 0]
    tensor(0.3333, grad_fn=<SelectBackward0>)
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(num_layers))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """``num_layers`` tensors (B, T, D) -> (B, T, D)."""
        if len(layers) != len(self.weights):
            raise ValueError(f"{len(layers)} layer outputs for {len(self.weights)} weights: "
                             "num_layers must be the encoder's number of layers")
        weights = self.weights.softmax(0)
        return sum(weight * layer for weight, layer in zip(weights, layers))


def masked_mean(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) frames, (B,) relative lengths -> (B, D) mean over each utterance's frames."""
    if lengths is None:
        return x.mean(1)
    frames = torch.round(lengths * x.shape[1]).clamp(min=1)
    valid = torch.arange(x.shape[1], device=x.device)[None] < frames[:, None]
    return (x * valid[..., None]).sum(1) / frames[:, None]


class PooledClassifier(torch.nn.Module):
    """Frames -> class logits: a frame-wise projection and ReLU, a mean over the utterance's
    frames (padding excluded), a linear output layer.

    Example
    -------
    >>> classifier = PooledClassifier(input_size=8, hidden_size=16, num_classes=3)
    >>> classifier(torch.randn(2, 10, 8), torch.tensor([1.0, 0.5])).shape
    torch.Size([2, 3])
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        self.project = torch.nn.Sequential(torch.nn.Linear(input_size, hidden_size),
                                           torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.output = torch.nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, input_size) frames, (B,) relative lengths -> (B, num_classes) logits."""
        return self.output(masked_mean(self.project(x), lengths))


def upstream_size(upstream: str, d_model: int, n_mels: int) -> int:
    """Frame size the classifier reads: the encoder's ``d_model``, or ``n_mels`` for the
    ``fbank`` upstream (the features themselves).

    Example
    -------
    >>> upstream_size("fbank", 144, 80), upstream_size("ssl", 144, 80)
    (80, 144)
    """
    return n_mels if upstream == "fbank" else d_model


class StreamingClassifier:
    """Classifies one stream (or B streams of equal length) chunk by chunk: the pooled mean is
    kept as a running sum, so a decision is ready after every chunk, and after the last one it
    equals the offline ``classifier(layer_sum(encoder(...)))`` under the same context.

    ``encoder`` and ``layer_sum`` None: the classifier reads the features (fbank upstream).

    Example
    -------
    >>> classifier = PooledClassifier(input_size=8, hidden_size=16, num_classes=3).eval()
    >>> stream = StreamingClassifier(None, None, classifier)
    >>> feats = torch.randn(1, 10, 8)
    >>> for start in range(0, 10, 4):
    ...     stream.push(feats[:, start:start + 4])
    >>> torch.allclose(stream.logits(), classifier(feats), atol=1e-6)
    True
    """

    def __init__(self, encoder, layer_sum: WeightedLayerSum | None, classifier: PooledClassifier,
                 context=None):
        self.encoder, self.layer_sum, self.classifier = encoder, layer_sum, classifier
        self.state = None if encoder is None else encoder.make_streaming_context(context)
        self.total, self.frames = 0.0, 0

    @property
    def chunk_frames(self) -> int:
        """Feature frames per pushed chunk (fbank upstream: any number)."""
        return 1 if self.encoder is None else self.encoder.chunk_frames(self.state)

    @torch.no_grad()
    def push(self, feats: torch.Tensor) -> None:
        """(B, chunk_frames, n_mels) normalized features of the next chunk (the last one may be
        shorter)."""
        x = feats
        if self.encoder is not None:
            x = self.layer_sum(self.encoder.forward_streaming(feats, self.state, all_layers=True))
        self.total = self.total + self.classifier.project(x).sum(1)
        self.frames += x.shape[1]

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """(B, num_classes): the decision on everything pushed so far."""
        if self.frames == 0:
            raise ValueError("no frame pushed yet: push a chunk before asking for a decision")
        return self.classifier.output(self.total / self.frames)
