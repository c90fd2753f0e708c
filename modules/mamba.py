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


def _log_backend_once(name: str) -> None:
    if name not in _backend_logged:
        _backend_logged.add(name)
        logger.info("Mamba scan backend: %s", name)


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
        return (self.scan_backend == "auto" and x.is_cuda and selective_scan_fn is not None
                and causal_conv1d_fn is not None)

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
            return out.transpose(1, 2), x[:, :, x.shape[2] - (self.d_conv - 1):]
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.d_conv - 1)
        x = torch.cat([cache, x], dim=2)
        out = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        return F.silu(out).transpose(1, 2), x[:, :, x.shape[2] - (self.d_conv - 1):]

    def _ssm_inputs(self, x: torch.Tensor):
        """(B, T, d_inner) -> step sizes (B, T, d_inner) and B, C (B, T, d_state)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        return delta, B, C

    def _scan(self, u, delta, B, C, initial_state=None):
        """Selective scan of (B, T, d_inner) from ``initial_state``: y and final state."""
        A = -torch.exp(self.A_log.float())
        if initial_state is None and self._fused_ok(u):
            _log_backend_once("mamba-ssm fused CUDA kernel")
            y, last = selective_scan_fn(
                u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                return_last_state=True)
            return y.transpose(1, 2), last
        return selective_scan(u, delta, A, B, C, initial_state, compiled=self._compiled(u))[:2]

    def forward(self, x: torch.Tensor, context: Context = (-1, -1), valid=None,
                lengths=None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model) under ``context`` (see the module docstring).

        ``valid`` and ``lengths`` are not needed: padding comes after the frames and the layer
        is causal.
        """
        left, right = context
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self._conv(u, None)[0]
        delta, B, C = self._ssm_inputs(u)
        if left == -1:
            y = self._scan(u, delta, B, C)[0]
        else:
            y = self._windowed_scan(u, delta, B, C, left, right + 1)
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))

    def _windowed_scan(self, u, delta, B, C, left: int, chunk: int) -> torch.Tensor:
        """Output of each chunk scanned from a zero state ``left`` frames before its start.

        One full causal scan does it: the state of a scan started after frame ``j`` is
        ``h_t - Phi(t, j) h_j`` with ``Phi(t, j) = exp(A * sum(delta[j + 1 .. t]))``, so
        ``y_t = C_t . h_t - C_t . Phi(t, j) h_j`` with ``j = chunk_start - left - 1``. The sum
        of step sizes is taken in float64 so that the decay keeps full precision.
        """
        A = -torch.exp(self.A_log.float())
        frames = u.shape[1]
        offset = (-left - 1) % chunk
        compiled = self._compiled(u)
        y, _, states = selective_scan(u, delta, A, B, C, state_stride=chunk, state_offset=offset,
                                      compiled=compiled)
        start = -(-(left + 1) // chunk) * chunk  # the first chunk with frames before its window
        if start >= frames:
            return y
        first_state = (start - left - 1 - offset) // chunk  # states are after offset + k chunk
        window_start = torch.arange(start, frames, device=u.device) // chunk * chunk - left - 1
        summed = delta.double().cumsum(1)
        dtype = states.dtype
        span = (summed[:, start:] - summed[:, window_start]).to(dtype)
        correction = window_correction(span, A.to(dtype), C[:, start:].to(dtype), states, chunk,
                                       first_state, compiled=compiled)
        return torch.cat([y[:, :start], y[:, start:] - correction.to(y.dtype)], dim=1)

    def forward_streaming(self, x: torch.Tensor, cache: dict, context: Context) -> torch.Tensor:
        """One chunk (B, C, d_model) -> (B, C, d_model), equal to the offline frames.

        ``cache`` (updated in place): ``conv`` (B, d_inner, d_conv - 1) and either ``state``
        (B, d_inner, d_state; ``left = -1``) or ``window`` (the last ``left`` SSM inputs).
        """
        left, _ = context
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, cache["conv"] = self._conv(u, cache.get("conv"))
        if left == -1:
            delta, B, C = self._ssm_inputs(u)
            y, cache["state"] = self._scan(u, delta, B, C, cache.get("state"))
        else:
            past = cache.get("window")
            window = u if past is None else torch.cat([past, u], dim=1)
            delta, B, C = self._ssm_inputs(window)
            y = self._scan(window, delta, B, C)[0][:, -u.shape[1]:]
            cache["window"] = window[:, max(0, window.shape[1] - left):] if left else None
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))
