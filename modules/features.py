"""Streaming-safe log-mel filterbank features.

SpeechBrain's ``Fbank`` centers its STFT frames (reflect/constant padding at both ends) and
clips each utterance at ``max - 80 dB``; both make a frame depend on audio far away from it,
so chunked audio would not give the offline features. This module keeps SpeechBrain's STFT
and mel filterbank but uses uncentered frames and a plain log, so frame ``i`` depends only on
samples ``[i * hop, i * hop + win)``.
"""
import torch
from speechbrain.processing.features import STFT, Filterbank, spectral_magnitude


class StreamingFbank(torch.nn.Module):
    """80-dim log-mel filterbank, 25 ms window, 10 ms hop, no centering, fixed energy floor.

    Arguments
    ---------
    n_mels : number of mel channels.
    sample_rate : audio sample rate in Hz.
    win_length_ms, hop_length_ms : STFT window and hop.
    log_floor : mel energies are floored here before the log (per frame, so streaming-safe).
        Digital silence (synthetic speech, padding) would otherwise sit at a far-away floor,
        inflate the global standard deviation and squeeze speech after normalization: on the
        shipped corpus 1e-5 (about 63 dB under the median frame peak) lifts the normalized
        speech std from 0.49 to 0.80 and the speech frames' code perplexity from 86 to 116.

    Example
    -------
    >>> fbank = StreamingFbank()
    >>> fbank(torch.randn(2, 16000)).shape
    torch.Size([2, 98, 80])
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000,
                 win_length_ms: float = 25.0, hop_length_ms: float = 10.0,
                 log_floor: float = 1e-5):
        super().__init__()
        if log_floor <= 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}")
        self.sample_rate = sample_rate
        self.log_floor = log_floor
        self.win_samples = int(round(sample_rate * win_length_ms / 1000))
        self.hop_samples = int(round(sample_rate * hop_length_ms / 1000))
        n_fft = self.win_samples  # torch.stft frames span n_fft samples: keep it = window
        self.stft = STFT(sample_rate=sample_rate, n_fft=n_fft, win_length=win_length_ms,
                         hop_length=hop_length_ms, center=False)
        self.filterbank = Filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels,
                                     log_mel=False)
        # SpeechBrain's Filterbank rebuilds its (constant) matrix on every call, a quarter of a
        # millisecond per streamed chunk: built once here, as the filterbank of the identity.
        self.register_buffer("mel_matrix", self.filterbank(torch.eye(n_fft // 2 + 1)),
                             persistent=False)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Number of complete frames in ``num_samples`` samples (0 when shorter than a window)."""
        frames = torch.div(num_samples - self.win_samples, self.hop_samples, rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def min_samples(self, frames: int) -> int:
        """Fewest samples that give ``frames`` feature frames."""
        return self.win_samples + (frames - 1) * self.hop_samples

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, frames, n_mels) log-mel energies (natural log), float32 always
        (also under autocast: the quantizer's targets come from these features)."""
        with torch.autocast(wavs.device.type, enabled=False):
            power = spectral_magnitude(self.stft(wavs.float()), power=1)
            return torch.log(torch.matmul(power, self.mel_matrix).clamp(min=self.log_floor))


class FbankStream:
    """Turns audio arriving in pieces of any size into the frames the offline path computes.

    Frame ``i`` covers samples ``[i * hop, i * hop + win)``; samples that no complete frame
    covers yet wait for the next piece (at most ``win - hop`` of them once a frame is out).

    Example
    -------
    >>> fbank = StreamingFbank()
    >>> stream = FbankStream(fbank)
    >>> audio = torch.randn(1, 16000)
    >>> frames = torch.cat([stream.push(audio[:, :5000]), stream.push(audio[:, 5000:])], dim=1)
    >>> torch.allclose(frames, fbank(audio), atol=1e-5)
    True
    """

    def __init__(self, fbank: StreamingFbank):
        self.fbank = fbank
        self.pending: torch.Tensor | None = None

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, n) new samples -> (B, frames, n_mels) newly completed frames (possibly none)."""
        audio = samples if self.pending is None else torch.cat([self.pending, samples], dim=1)
        frames = int(self.fbank.num_frames(torch.tensor(audio.shape[1])))
        self.pending = audio[:, frames * self.fbank.hop_samples:]
        if frames == 0:
            return audio.new_zeros(audio.shape[0], 0, self.fbank.filterbank.n_mels)
        return self.fbank(audio[:, : self.fbank.min_samples(frames)])
