"""Running signal-to-noise ratio of incoming audio, for the adaptive streaming controller.

SNR here is ``10 * log10(speech energy / noise energy)`` over the analysed segment, where the
speech energy is that of the clean speech signal over the whole segment, its pauses included, and
the noise energy that of the additive noise over the same segment. Estimates are clipped to
``SNR_RANGE_DB`` (-20 to 60 dB); digital silence (all zeros) reads as the top, 60 dB.

Two estimators (``method=``):

``"energy"`` (default): minimum statistics on 25 ms frames. The noise floor is the
``NOISE_QUANTILE`` (2 %) quantile of the frame variances, divided by the ratio that quantile has to
the mean for white Gaussian noise (the chi-square quantile with ``frame - 1`` degrees of freedom,
Wilson-Hilferty approximation); the speech power is the mean frame variance minus that floor; every
other part of the power is noise, including the frames' means, i.e. the content below about 20 Hz.
Assumptions: the noise is stationary within the window, some frames (pauses, stop closures) hold
little speech, and speech has no energy below about 20 Hz. The last one is what makes the slow
drift of brown and pink noise (96 % and 35 % of the shipped noises' energy is below 10 Hz) count as
noise; it also counts the synthesizer's own sub-20 Hz content (about -28 dB of the speech) as
noise, so clean espeak speech reads about 26 dB (median over 2 s windows).

``"wada"``: WADA-SNR (Kim and Stern, Interspeech 2008). Speech amplitudes are modelled as
Gamma-distributed (shape 0.4), the noise as Gaussian; ``G = log(mean|z|) - mean(log|z|)`` of the
noisy samples ``z`` grows with the SNR, from about 0.41 (Gaussian noise alone) to 1.65 (the Gamma
speech alone). The ``G(SNR)`` table is computed here by Monte Carlo (``wada_table``, fixed seed, at
first use) and inverted by linear interpolation. Below about -10 dB ``G`` is within the Monte Carlo
noise of its Gaussian limit, so WADA cannot tell -20 from -10 dB. It needs no pauses but its model
fits espeak speech poorly, and hum (a sum of sinusoids, not Gaussian) and brown noise (mostly a
slow drift) read far too low, babble (itself speech) too high.

Measured on the shipped corpus (``data/espeak_corpus``, its 20 test utterances; the design choices,
25 ms frames, the 2 % quantile and the frame-mean split, were made on the 20 validation ones): 2 s
windows every 1 s (the whole utterance when shorter: 57 windows), each mixed with a random 2 s
stretch of each shipped noise (``noise/*.flac``) scaled to exactly the target SNR over the window.
Absolute error of ``"energy"`` in dB, mean / largest:

======  =========  =========  =========  =========  =========  =========  =========
noise     -5 dB       0 dB       5 dB      10 dB      15 dB      20 dB      30 dB
======  =========  =========  =========  =========  =========  =========  =========
white   1.5/2.7    0.8/1.5    0.7/1.3    0.7/1.6    1.0/2.5    1.7/4.8    6.0/12.8
pink    1.5/2.4    0.6/1.1    0.3/0.8    0.4/1.3    0.6/2.8    1.4/5.2    5.9/12.8
brown   0.3/0.5    0.1/0.4    0.1/0.6    0.2/0.9    0.5/1.9    1.3/4.1    5.7/12.6
babble  12.0/15.9  7.9/12.7   5.3/10.9   3.7/9.6    2.6/7.9    2.3/5.9    5.7/12.9
hum     0.4/1.0    0.2/0.5    0.2/0.7    0.4/1.4    0.7/2.1    1.6/4.4    6.0/12.6
======  =========  =========  =========  =========  =========  =========  =========

Mean absolute error over all seven SNRs, ``"energy"`` / ``"wada"``: white 1.8 / 2.2, pink 1.5 /
2.3, brown 1.2 / 5.7, babble 5.6 / 5.1, hum 1.3 / 7.4 dB (WADA reads hum and brown noise at -5 and
0 dB 10 to 19 dB too low); hence ``"energy"`` is the default. With stationary noise (white, pink,
brown, hum) the energy estimate is within 3 dB up to 15 dB (3.4 dB on the validation windows) and
5.2 dB at 20 dB (6.1 dB on validation); above that it reads low (windows without a pause take
speech for the floor: at 30 dB it reads 17 to 30 dB, 15 to 30 on validation). Babble, whose pauses
are other voices, reads high: up to 16 dB too high at -5 dB, 8 dB on average at 0 dB.
``tests/test_snr.py`` checks these bounds with a margin. Cost: about 0.45 ms per ``RunningSNR.push``
with a full 2 s window (0.5 ms with ``"wada"``; medians with 40 and 320 ms chunks on a shared, busy
2-core CPU).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

SNR_RANGE_DB = (-20.0, 60.0)
METHODS = ("energy", "wada")
FRAME_SECONDS = 0.025
NOISE_QUANTILE = 0.02
GAMMA_SHAPE = 0.4
WADA_SAMPLES = 2 ** 18
WADA_SEED = 0


def estimate_snr_db(samples: torch.Tensor, method: str = "energy",
                    sample_rate: int = 16000) -> float:
    """SNR in dB of a (n,) segment of audio: ``10 log10(speech energy / noise energy)``, with
    the energy of the clean speech over the whole segment (pauses included).

    Arguments
    ---------
    samples : (n,) audio of any float dtype and device (computed on the CPU). ``"energy"``
        needs at least one 25 ms frame (a single frame reads as the bottom: its variance is its
        own floor) and aligns its frames to the end, leaving out up to one frame's worth of the
        oldest samples; ``"wada"`` needs n >= 1. Both are poor on less than about 0.5 s.
    method : ``"energy"`` (minimum statistics, the more accurate on the shipped corpus) or
        ``"wada"`` (WADA-SNR); see the module docstring.
    sample_rate : in Hz (the ``"energy"`` frames are 25 ms).

    Returns
    -------
    The estimate, clipped to ``SNR_RANGE_DB``; the top (60 dB) for digital silence.

    Example
    -------
    >>> noise = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    >>> estimate_snr_db(noise) < 0  # noise alone
    True
    >>> estimate_snr_db(torch.zeros(16000))
    60.0
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _estimate(_to_numpy(samples), method, sample_rate)


def _to_numpy(samples: torch.Tensor) -> np.ndarray:
    """(n,) tensor of any float dtype and device -> (n,) float64 array."""
    if samples.dim() != 1:
        raise ValueError(f"samples must have shape (n,), got {tuple(samples.shape)}")
    return samples.detach().to("cpu", torch.float64).numpy()


def _estimate(x: np.ndarray, method: str, sample_rate: int) -> float:
    """``estimate_snr_db`` of a (n,) float64 array."""
    return _energy_snr_db(x, sample_rate) if method == "energy" else _wada_snr_db(x)


def _clip_db(speech_power: float, noise_power: float) -> float:
    """``10 log10(speech / noise)`` clipped to ``SNR_RANGE_DB``; no noise reads as the top."""
    low, high = SNR_RANGE_DB
    if noise_power <= 0:
        return high
    if speech_power <= 0:
        return low
    return float(np.clip(10 * math.log10(speech_power / noise_power), low, high))


def chi2_quantile_ratio(q: float, dof: int) -> float:
    """Quantile ``q`` of a chi-square variable with ``dof`` degrees of freedom over its mean
    (Wilson-Hilferty approximation): where the ``q`` quantile of the variances of frames of
    white Gaussian noise lies, relative to the noise power.

    Example
    -------
    >>> round(chi2_quantile_ratio(0.5, 399), 3)
    0.998
    """
    z = torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()
    a = 2.0 / (9.0 * dof)
    return (1.0 - a + z * math.sqrt(a)) ** 3


def _energy_snr_db(x: np.ndarray, sample_rate: int) -> float:
    """Minimum statistics on 25 ms frames of (n,) audio (see the module docstring)."""
    frame = round(FRAME_SECONDS * sample_rate)
    num_frames = len(x) // frame
    if num_frames == 0:
        raise ValueError(f"need at least one {frame}-sample frame, got {len(x)} samples")
    frames = x[len(x) - num_frames * frame:].reshape(num_frames, frame)
    means, variances = frames.mean(axis=1), frames.var(axis=1)
    floor = np.quantile(variances, NOISE_QUANTILE) / chi2_quantile_ratio(NOISE_QUANTILE, frame - 1)
    speech = variances.mean() - floor
    return _clip_db(speech, (variances + means ** 2).mean() - speech)


def _wada_snr_db(x: np.ndarray) -> float:
    """WADA-SNR of (n,) audio (see the module docstring)."""
    if len(x) == 0:
        raise ValueError("need at least one sample")
    magnitudes = np.abs(x)
    if magnitudes.max() == 0:
        return SNR_RANGE_DB[1]
    g, snr_db = wada_table()
    return float(np.interp(_wada_g(magnitudes), g, snr_db))


def _wada_g(magnitudes: np.ndarray) -> float:
    """``log(mean|z|) - mean(log|z|)`` of (n,) magnitudes ``|z|`` (not all zero); magnitudes
    are floored at 1e-10 of the largest (as in the original WADA code)."""
    magnitudes = np.maximum(magnitudes, magnitudes.max() * 1e-10)
    return float(np.log(magnitudes.mean()) - np.log(magnitudes).mean())


@functools.lru_cache(maxsize=None)
def wada_table() -> tuple[np.ndarray, np.ndarray]:
    """WADA's ``G(SNR)`` table by Monte Carlo, computed once (about 0.6 s).

    ``WADA_SAMPLES`` unit-power speech amplitudes ``a ~ Gamma(GAMMA_SHAPE)`` and Gaussian
    noise ``e`` (numpy generator seeded with ``WADA_SEED``), the same draws for every SNR of a
    1 dB grid over ``SNR_RANGE_DB``: ``z = a + e * 10 ** (-snr / 20)``. Grid points whose ``G``
    does not exceed every lower point's (the flat end under about -10 dB, within Monte Carlo
    noise) are dropped so that ``G`` increases strictly.

    Returns
    -------
    g : (k,) increasing ``G`` values.
    snr_db : (k,) the SNRs they belong to.
    """
    rng = np.random.default_rng(WADA_SEED)
    speech = rng.standard_gamma(GAMMA_SHAPE, WADA_SAMPLES)
    speech /= math.sqrt(GAMMA_SHAPE * (GAMMA_SHAPE + 1))  # E[a^2] = shape (shape + 1)
    noise = rng.standard_normal(WADA_SAMPLES)
    snr_db = np.arange(SNR_RANGE_DB[0], SNR_RANGE_DB[1] + 0.5, 1.0)
    g = np.array([_wada_g(np.abs(speech + noise * 10 ** (-snr / 20))) for snr in snr_db])
    keep = g > np.maximum.accumulate(np.concatenate([[-np.inf], g[:-1]]))
    return g[keep], snr_db[keep]


class RunningSNR:
    """SNR of the last ``window_seconds`` of a stream, updated as audio arrives.

    Keeps a ring buffer of the last ``window_seconds`` of samples (memory does not grow with
    the stream) and re-estimates over it at each push: about 0.45 ms for a full 2 s window with
    ``"energy"``, 0.5 ms with ``"wada"`` (whose table, about 0.6 s, is computed at
    construction).

    Arguments
    ---------
    sample_rate : in Hz.
    window_seconds : length of audio the estimate is over.
    min_seconds : no estimate (``None``) until this much audio has arrived; at least one 25 ms
        frame and at most ``window_seconds``.
    method : estimator, as in ``estimate_snr_db``.

    Example
    -------
    >>> snr = RunningSNR(min_seconds=0.5)
    >>> snr.push(torch.zeros(4000)) is None  # 0.25 s so far
    True
    >>> snr.push(torch.zeros(4000))  # digital silence: the top
    60.0
    """

    def __init__(self, sample_rate: int = 16000, window_seconds: float = 2.0,
                 min_seconds: float = 0.5, method: str = "energy"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not FRAME_SECONDS <= min_seconds <= window_seconds:
            raise ValueError(f"need {FRAME_SECONDS} <= min_seconds <= window_seconds, got "
                             f"min_seconds={min_seconds}, window_seconds={window_seconds}")
        self.sample_rate = sample_rate
        self.method = method
        self.capacity = round(window_seconds * sample_rate)
        self.min_samples = round(min_seconds * sample_rate)
        self.num_buffered = 0
        self._buffer = np.zeros(self.capacity)
        self._end = 0  # where the next sample goes
        if method == "wada":
            wada_table()

    def push(self, samples: torch.Tensor) -> float | None:
        """Appends (n,) new samples (any float dtype and device); returns the SNR in dB over the
        buffered window, or ``None`` while fewer than ``min_seconds`` of audio have arrived."""
        self._append(_to_numpy(samples))
        if self.num_buffered < self.min_samples:
            return None
        return _estimate(self.window(), self.method, self.sample_rate)

    def window(self) -> np.ndarray:
        """(num_buffered,) the buffered samples, oldest first."""
        if self.num_buffered < self.capacity:
            return self._buffer[:self.num_buffered]
        return np.concatenate([self._buffer[self._end:], self._buffer[:self._end]])

    def _append(self, x: np.ndarray) -> None:
        x = x[-self.capacity:]
        head = min(len(x), self.capacity - self._end)
        self._buffer[self._end:self._end + head] = x[:head]
        self._buffer[:len(x) - head] = x[head:]
        self._end = (self._end + len(x)) % self.capacity
        self.num_buffered = min(self.num_buffered + len(x), self.capacity)
