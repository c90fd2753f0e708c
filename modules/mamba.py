"""Mamba-1 selective SSM layer with chunk-limited state windows and exact streaming.

Parameter names and shapes are those of ``mamba_ssm.modules.mamba_simple.Mamba`` (``in_proj,
conv1d, x_proj, dt_proj, A_log, D, out_proj``), so state dicts load both ways.

Context ``[left, right]`` (encoder frames, chunks of ``right + 1``): the SSM of chunk ``c``
starts from a zero state ``left`` frames before the chunk start, so output frame ``t`` depends on
SSM inputs ``[chunk_start - left, t]`` and, through the causal ``conv1d``, on layer inputs
``[chunk_start - left - (d_conv - 1), t]``: never on the future (not even inside its chunk),
and on a bounded past. ``left = -1``: one causal scan over all the past (its streaming state is
still a fixed-size summary). The offline ``[-1, -1]`` of a unidirectional layer is that scan too.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .context import Context
from .selective_scan import compiled_scan_available, selective_scan, window_correction

logger = logging.getLogger(__name__)

try:  # optional fused CUDA kernels
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except (ImportError, OSError):  # not installed, or built for another CUDA / torch
    causal_conv1d_fn = selective_scan_fn = None

_backend_logged = set()
SCAN_BACKENDS = ("auto", "compiled", "chunked")
FUSED_DEVICE_TYPES = ("cuda",)  # where mamba-ssm's kernels run
# Chunk-limited contexts on the fused kernel scan each chunk's window separately: (left + chunk)
# / chunk times the frames of one full scan. Above this factor, the chunked scan and the window
# correction are used instead.
FUSED_MAX_WINDOW_FACTOR = 32


def _log_backend_once(name: str) -> None:
    if name not in _backend_logged:
        _backend_logged.add(name)
        logger.info("Mamba scan backend: %s", name)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast) -> float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _windows(t: torch.Tensor, left: int, chunk: int) -> torch.Tensor:
    """(B, L, X) -> (B * K, X, left + chunk): the SSM window of each of the K chunks, zeros before
    frame 0 and after the end, in the (batch, channels, time) layout of the fused kernels."""
    batch, frames, channels = t.shape
    chunks = -(-frames // chunk)
    padded = F.pad(t, (0, 0, left, chunks * chunk - frames))
    return padded.unfold(1, left + chunk, chunk).reshape(batch * chunks, channels, left + chunk)


def _fused_scan(u, dt, A, B, C, delta_bias, return_last_state=False):
    """mamba-ssm's kernel on (B, L, .) tensors: step sizes ``softplus(dt + delta_bias)`` in float32
    inside the kernel, so ``u``, ``dt``, ``B`` and ``C`` stay in one dtype (bf16 under autocast)
    and ``A``, ``delta_bias`` in float32, as the kernel requires."""
    dtype = u.dtype
    out = selective_scan_fn(*(t.transpose(1, 2).contiguous() for t in (u, dt.to(dtype))), A,
                            *(t.transpose(1, 2).contiguous() for t in (B.to(dtype), C.to(dtype))),
                            delta_bias=delta_bias, delta_softplus=True,
                            return_last_state=return_last_state)
    if return_last_state:
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)


def _fused_windowed_scan(u, dt, A, B, C, delta_bias, left: int, chunk: int) -> torch.Tensor:
    """Every chunk scanned by the fused kernel from a zero state ``left`` frames before its start
    (the definition of a chunk-limited context; zero inputs before frame 0 leave the state at
    zero). The windows are gathered again in the backward pass (``checkpoint``), so only the
    (B, L, .) inputs are kept for it."""
    frames = u.shape[1]

    def run(u, dt, B, C):
        windows = [_windows(t, left, chunk).transpose(1, 2) for t in (u, dt, B, C)]
        y = _fused_scan(*windows[:2], A, *windows[2:], delta_bias)[:, left:]  # (B * K, chunk, D)
        return y.reshape(u.shape[0], -1, u.shape[2])[:, :frames]

    return checkpoint(run, u, dt, B, C, use_reentrant=False)


def _window_spans(delta: torch.Tensor, left: int, chunk: int, start: int) -> torch.Tensor:
    """(B, L, D) step sizes -> (B, L - start, D): for frames ``t >= start`` (a multiple of
    ``chunk``), the sum of ``delta`` from their chunk's window start ``chunk_start - left`` to
    ``t``: the ``left`` frames before the chunk, then a running sum inside the chunk."""
    batch, frames, dim = delta.shape
    chunks = -(-(frames - start) // chunk)
    inside = F.pad(delta[:, start:], (0, 0, 0, chunks * chunk - (frames - start)))
    inside = inside.view(batch, chunks, chunk, dim).cumsum(2)
    if left:  # window k: frames [start + k chunk - left, start + k chunk)
        before = delta[:, start - left:start + (chunks - 1) * chunk]
        inside = inside + before.unfold(1, left, chunk).sum(-1).unsqueeze(2)
    return inside.view(batch, -1, dim)[:, :frames - start]


class Mamba(torch.nn.Module):
    """Selective state-space layer: (B, T, d_model) -> (B, T, d_model).

    Arguments
    ---------
    d_model : model dimension.
    d_state : SSM state size per channel (N).
    d_conv : causal depthwise convolution width.
    expand : inner dimension = ``expand * d_model``.
    dt_min, dt_max, dt_init_floor : initialization range of the step sizes.
    scan_backend : "auto": mamba-ssm / causal-conv1d kernels on CUDA when installed (full scans
        from a zero state), else the compiled CPU scan where ``compiled_scan_available``, else
        the chunked one; "compiled" or "chunked" force that scan (see ``modules.selective_scan``).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan_backend: str = "auto"):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = math.ceil(d_model / 16)
        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {SCAN_BACKENDS}, got {scan_backend!r}")
        self.scan_backend = scan_backend
        self.in_proj = torch.nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = torch.nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                      padding=d_conv - 1)
        self.x_proj = torch.nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = torch.nn.Linear(self.dt_rank, self.d_inner, bias=True)
        torch.nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():  # bias = softplus^-1(dt), as mamba-ssm initializes it
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = torch.nn.Parameter(torch.log(A))
        self.D = torch.nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=False)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        return (self.scan_backend == "auto" and x.device.type in FUSED_DEVICE_TYPES
                and selective_scan_fn is not None and causal_conv1d_fn is not None)

    def _compiled(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is scanned by the compiled CPU kernel (the choice is logged once)."""
        if self.scan_backend == "chunked" or (
                self.scan_backend == "auto" and not compiled_scan_available(x.device)):
            _log_backend_once("chunked scan (eager PyTorch)")
            return False
        if not compiled_scan_available(x.device):
            raise RuntimeError(f"scan_backend 'compiled' needs CPU tensors and a C++ compiler "
                               f"(g++ or clang++, or set CXX); got {x.device.type} tensors. "
                               "Use scan_backend: auto or chunked")
        _log_backend_once("compiled CPU scan (modules/selective_scan_cpu.cpp)")
        return True

    def _conv(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU over (B, T, d_inner); cache: previous d_conv - 1 frames."""
        x = x.transpose(1, 2)
        if cache is None and self._fused_ok(x):
            out = causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   activation="silu")
            # the zeros before the first frame too, when x is shorter than the cache
            return out.transpose(1, 2), F.pad(x, (self.d_conv - 1, 0))[:, :, x.shape[2]:]
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.d_conv - 1)
        x = torch.cat([cache, x], dim=2)
        out = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        return F.silu(out).transpose(1, 2), x[:, :, x.shape[2] - (self.d_conv - 1):]

    def _ssm_inputs(self, x: torch.Tensor):
        """(B, T, d_inner) -> dt (B, T, d_inner; before the bias and softplus) and B, C
        (B, T, d_state), all in ``x``'s dtype (bf16 under autocast)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _delta(self, dt: torch.Tensor) -> torch.Tensor:
        """Step sizes ``softplus(dt + bias)`` in float32 at least, as the fused kernel takes them."""
        return F.softplus(_at_least_float32(dt) + _at_least_float32(self.dt_proj.bias))

    def _A(self) -> torch.Tensor:
        return -torch.exp(_at_least_float32(self.A_log))

    def _scan(self, u, dt, B, C, initial_state=None):
        """Selective scan of (B, T, d_inner) from ``initial_state``: y and final state."""
        if initial_state is None and self._fused_ok(u):
            _log_backend_once("mamba-ssm fused CUDA kernel")
            return _fused_scan(u, dt, self._A(), B, C, self.dt_proj.bias.float(),
                               return_last_state=True)
        return selective_scan(u, self._delta(dt), self._A(), B, C, initial_state,
                              compiled=self._compiled(u))[:2]

    def forward(self, x: torch.Tensor, context: Context = (-1, -1), valid=None,
                lengths=None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model) under ``context`` (see the module docstring).

        ``valid`` and ``lengths`` are not needed: padding comes after the frames and the layer
        is causal.
        """
        left, right = context
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self._conv(u, None)[0]
        dt, B, C = self._ssm_inputs(u)
        if left == -1:
            y = self._scan(u, dt, B, C)[0]
        elif self._fused_ok(u) and (left + right + 1) <= FUSED_MAX_WINDOW_FACTOR * (right + 1):
            _log_backend_once("mamba-ssm fused CUDA kernel, one window per chunk")
            y = _fused_windowed_scan(u, dt, self._A(), B, C, self.dt_proj.bias.float(), left,
                                     right + 1)
        else:
            y = self._windowed_scan(u, self._delta(dt), B, C, left, right + 1)
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))

    def _windowed_scan(self, u, delta, B, C, left: int, chunk: int) -> torch.Tensor:
        """Output of each chunk scanned from a zero state ``left`` frames before its start.

        One full causal scan does it: the state of a scan started after frame ``j`` is
        ``h_t - Phi(t, j) h_j`` with ``Phi(t, j) = exp(A * span_t)``, ``span_t = sum(delta[j + 1
        .. t])``, so ``y_t = C_t . h_t - C_t . Phi(t, j) h_j`` with ``j = chunk_start - left - 1``.
        ``span`` is summed over the window itself (at most ``left + chunk`` terms, not a running
        sum over the utterance), so it keeps full precision without float64 (which MPS lacks).
        """
        A = self._A()
        frames = u.shape[1]
        offset = (-left - 1) % chunk
        compiled = self._compiled(u)
        y, _, states = selective_scan(u, delta, A, B, C, state_stride=chunk, state_offset=offset,
                                      compiled=compiled)
        start = -(-(left + 1) // chunk) * chunk  # the first chunk with frames before its window
        if start >= frames:
            return y
        first_state = (start - left - 1 - offset) // chunk  # states are after offset + k chunk
        dtype = states.dtype
        span = _window_spans(delta.to(dtype), left, chunk, start)
        correction = window_correction(span, A.to(dtype), C[:, start:].to(dtype), states, chunk,
                                       first_state, compiled=compiled)
        return torch.cat([y[:, :start], y[:, start:] - correction.to(y.dtype)], dim=1)

    def forward_streaming(self, x: torch.Tensor, cache: dict, context: Context,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk (B, C, d_model) -> (B, C, d_model), equal to the offline frames (``valid``
        is not needed: the layer is causal and padding comes after a stream's frames).

        ``cache`` (updated in place): ``conv`` (B, d_inner, d_conv - 1) and either ``state``
        (B, d_inner, d_state; ``left = -1``) or ``window`` (the last ``left`` SSM inputs).
        """
        left, _ = context
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, cache["conv"] = self._conv(u, cache.get("conv"))
        if left == -1:
            y, cache["state"] = self._scan(u, *self._ssm_inputs(u), cache.get("state"))
        else:
            past = cache.get("window")
            window = u if past is None else torch.cat([past, u], dim=1)
            y = self._scan(window, *self._ssm_inputs(window))[0][:, -u.shape[1]:]
            cache["window"] = window[:, max(0, window.shape[1] - left):] if left else None
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))
