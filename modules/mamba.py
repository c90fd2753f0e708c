"""Mamba-1 selective SSM layer with chunk-limited state windows and exact streaming.

Parameter names and shapes are those of ``mamba_ssm.modules.mamba_simple.Mamba`` (``in_proj,
conv1d, x_proj, dt_proj, A_log, D, out_proj``), so state dicts load both ways.

Context ``[left, right]`` (encoder frames, chunks of ``right + 1``): the SSM of chunk ``c``
starts from a zero state ``left`` frames before the chunk start, so output frame ``t`` depends on
SSM inputs ``[chunk_start - left, t]`` and, through the causal ``conv1d``, on layer inputs
``[chunk_start - left - (d_conv - 1), t]``: never on the future (not even inside its chunk),
and on a bounded past. ``left = -1``: one causal scan over all the past (its streaming state is
still a fixed-size summary). The offline ``[-1, -1]`` of a unidirectional layer is that scan too.

Scans: mamba-ssm's fused CUDA kernels where ``mamba-ssm`` and ``causal-conv1d`` import, else the
compiled or chunked scan of ``modules.selective_scan`` (``Mamba``'s ``scan_backend``). Installed
packages that do not import are not a silent fallback: one warning at import, the error kept in
``FUSED_IMPORT_ERROR``, and ``scan_backend: fused`` refuses to run without them.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .context import Context, PiecewiseContext
from .layers import depthwise_conv
from .selective_scan import compiled_scan_available, selective_scan, window_correction

logger = logging.getLogger(__name__)

FUSED_PACKAGES = ("mamba_ssm", "causal_conv1d")
FUSED_FIX = ("reinstall them against this torch ({}): "
             "pip install --no-build-isolation -r requirements-cuda.txt")


def _import_fused_kernels() -> tuple[Callable | None, Callable | None, str | None]:
    """mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``.

    Returns
    -------
    scan_fn, conv_fn : the kernels, or None.
    error : None if they imported or neither package is installed (the eager scans are then
        the intended path); else the import error, also logged as a warning.
    """
    if all(importlib.util.find_spec(name) is None for name in FUSED_PACKAGES):
        return None, None, None
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    # any failure: a wheel built against another torch or CUDA (undefined symbol), a dependency
    # (transformers) that moved what mamba-ssm imports, one of the two packages missing
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        logger.warning("mamba-ssm / causal-conv1d are installed but do not import, so Mamba "
                       "runs the slower eager scan: %s. To use the fused kernels, %s", message,
                       FUSED_FIX.format(torch.__version__))
        return None, None, message
    return selective_scan_fn, causal_conv1d_fn, None


selective_scan_fn, causal_conv1d_fn, FUSED_IMPORT_ERROR = _import_fused_kernels()

_backend_logged = set()
SCAN_BACKENDS = ("auto", "fused", "compiled", "chunked")
FUSED_DEVICE_TYPES = ("cuda",)  # where mamba-ssm's kernels run
# Chunk-limited contexts on the fused kernel scan each chunk's window separately: (left + chunk)
# / chunk times the frames of one full scan. Above this factor, the chunked scan and the window
# correction are used instead.
FUSED_MAX_WINDOW_FACTOR = 32


def fused_kernels_error() -> str | None:
    """Why mamba-ssm's kernels cannot run here (None: they can, on CUDA tensors)."""
    if selective_scan_fn is not None and causal_conv1d_fn is not None:
        return None
    if FUSED_IMPORT_ERROR is not None:
        return (f"mamba-ssm / causal-conv1d are installed but do not import "
                f"({FUSED_IMPORT_ERROR}); {FUSED_FIX.format(torch.__version__)}")
    return ("mamba-ssm / causal-conv1d are not installed: "
            "pip install --no-build-isolation -r requirements-cuda.txt")


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
    scan_backend : "auto": mamba-ssm / causal-conv1d kernels on CUDA when they import (scans
        from a zero state), else the compiled CPU scan where ``compiled_scan_available``, else
        the chunked one; "fused": as "auto", but a RuntimeError (quoting the import error) where
        the kernels cannot run: not importable, or not CUDA tensors (windows over
        ``FUSED_MAX_WINDOW_FACTOR`` chunks and streaming from a carried state still take the
        eager scan); "compiled" or "chunked" force that scan (see ``modules.selective_scan``).
        ``backend_for`` says which one runs.
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
        if scan_backend == "fused" and fused_kernels_error():
            raise RuntimeError(f"scan_backend 'fused': {fused_kernels_error()}")
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

    def backend_for(self, device: torch.device | str, context: Context = (-1, -1)) -> str:
        """The scan that ``forward`` runs on ``device`` under ``context``: "fused" (mamba-ssm),
        "compiled" or "chunked" (raises where ``scan_backend`` cannot run there)."""
        left, right = context
        if self._fused_ok(device) and (
                left == -1 or left + right + 1 <= FUSED_MAX_WINDOW_FACTOR * (right + 1)):
            _log_backend_once("mamba-ssm fused CUDA kernel" if left == -1 else
                              "mamba-ssm fused CUDA kernel, one window per chunk")
            return "fused"
        return "compiled" if self._compiled(device) else "chunked"

    def _fused_ok(self, device: torch.device | str) -> bool:
        """Whether the fused kernels run on ``device`` (scans from a zero state)."""
        device_type = torch.device(device).type  # without kernels, __init__ refused "fused"
        if self.scan_backend == "fused" and device_type not in FUSED_DEVICE_TYPES:
            raise RuntimeError(f"scan_backend 'fused' needs CUDA tensors (mamba-ssm's kernels), "
                               f"got {device_type} tensors; use scan_backend: auto")
        return (self.scan_backend in ("auto", "fused") and device_type in FUSED_DEVICE_TYPES
                and fused_kernels_error() is None)

    def _compiled(self, device: torch.device | str) -> bool:
        """Whether ``device`` runs the compiled CPU kernel rather than the chunked scan, where
        the fused kernels do not run (the choice is logged once)."""
        if self.scan_backend == "chunked" or (
                self.scan_backend != "compiled" and not compiled_scan_available(device)):
            _log_backend_once("chunked scan (eager PyTorch)")
            return False
        if not compiled_scan_available(device):
            raise RuntimeError(f"scan_backend 'compiled' needs CPU tensors and a C++ compiler "
                               f"(g++ or clang++, or set CXX); got {torch.device(device).type} "
                               "tensors. Use scan_backend: auto or chunked")
        _log_backend_once("compiled CPU scan (modules/selective_scan_cpu.cpp)")
        return True

    def _conv(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU over (B, T, d_inner); cache: previous d_conv - 1 frames."""
        x = x.transpose(1, 2)
        if cache is None and self._fused_ok(x.device):
            out = causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   activation="silu")
            # the zeros before the first frame too, when x is shorter than the cache
            return out.transpose(1, 2), F.pad(x, (self.d_conv - 1, 0))[:, :, x.shape[2]:]
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], self.d_conv - 1)
        x = torch.cat([cache, x], dim=2)
        out = depthwise_conv(x, self.conv1d.weight, self.conv1d.bias)
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
        if initial_state is None and self.backend_for(u.device) == "fused":
            return _fused_scan(u, dt, self._A(), B, C, self.dt_proj.bias.float(),
                               return_last_state=True)
        return selective_scan(u, self._delta(dt), self._A(), B, C, initial_state,
                              compiled=self._compiled(u.device))[:2]

    def forward(self, x: torch.Tensor, context: Context = (-1, -1), valid=None,
                lengths=None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model) under ``context`` (see the module docstring).

        ``valid`` and ``lengths`` are not needed: padding comes after the frames and the layer
        is causal.
        """
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self._conv(u, None)[0]
        if isinstance(context, PiecewiseContext):
            return self.out_proj((self._piecewise_scan(u, context) + u * self.D) * F.silu(z))
        left, right = context
        dt, B, C = self._ssm_inputs(u)
        backend = self.backend_for(u.device, context)
        if backend == "fused" and left == -1:
            y = _fused_scan(u, dt, self._A(), B, C, self.dt_proj.bias.float())
        elif backend == "fused":
            y = _fused_windowed_scan(u, dt, self._A(), B, C, self.dt_proj.bias.float(), left,
                                     right + 1)
        elif left == -1:
            y = selective_scan(u, self._delta(dt), self._A(), B, C,
                               compiled=backend == "compiled")[0]
        else:
            y = self._windowed_scan(u, self._delta(dt), B, C, left, right + 1,
                                    compiled=backend == "compiled")
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))

    def _piecewise_scan(self, u: torch.Tensor, context: PiecewiseContext) -> torch.Tensor:
        """The reference of a switched stream: every chunk of every row scanned on its own, from
        a zero state at its window start (one scan per chunk: slow, for tests)."""
        first, last = context.windows(u.shape[1])
        first, last = (t.expand(u.shape[0], -1).tolist() for t in (first, last))
        rows = []
        for b in range(u.shape[0]):
            pieces, start = [], 0
            while start < u.shape[1]:
                end = min(last[b][start] + 1, u.shape[1])
                window = u[b:b + 1, first[b][start]:end]
                pieces.append(self._scan(window, *self._ssm_inputs(window))[0][:, start - end:])
                start = end
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows)

    def _windowed_scan(self, u, delta, B, C, left: int, chunk: int,
                       compiled: bool) -> torch.Tensor:
        """Output of each chunk scanned from a zero state ``left`` frames before its start.

        One full causal scan does it: the state of a scan started after frame ``j`` is
        ``h_t - Phi(t, j) h_j`` with ``Phi(t, j) = exp(A * span_t)``, ``span_t = sum(delta[j + 1
        .. t])``, so ``y_t = C_t . h_t - C_t . Phi(t, j) h_j`` with ``j = chunk_start - left - 1``.
        ``span`` is summed over the window itself (at most ``left + chunk`` terms, not a running
        sum over the utterance), so it keeps full precision without float64 (which MPS lacks).
        ``h_t`` and ``Phi h_j`` nearly cancel for slow decays: ``y`` is scanned in float32 (not
        rounded to ``u``'s half precision under autocast) and rounded once, after the subtraction.
        """
        A = self._A()
        frames = u.shape[1]
        offset = (-left - 1) % chunk
        y, _, states = selective_scan(_at_least_float32(u), delta, A, B, C, state_stride=chunk,
                                      state_offset=offset, compiled=compiled)
        start = -(-(left + 1) // chunk) * chunk  # the first chunk with frames before its window
        if start >= frames:
            return y.to(u.dtype)
        first_state = (start - left - 1 - offset) // chunk  # states are after offset + k chunk
        dtype = states.dtype
        span = _window_spans(delta.to(dtype), left, chunk, start)
        correction = window_correction(span, A.to(dtype), C[:, start:].to(dtype), states, chunk,
                                       first_state, compiled=compiled)
        return torch.cat([y[:, :start], y[:, start:] - correction], dim=1).to(u.dtype)

    def _fixed_window_step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """``forward_streaming`` of one stream with caches of a fixed size (for
        ``modules.compiled_stream``), on the eager chunked scan: ``cache["conv"]`` (1, d_inner,
        d_conv - 1) and either ``cache["state"]`` (1, d_inner, d_state; ``cache["left"]`` -1)
        or ``cache["window"]`` (1, size, d_inner): the last SSM inputs, zeros before the
        stream's start (a zero input leaves a zero state at zero), of which the chunk's scan
        sees the last ``cache["left"]``."""
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, cache["conv"] = self._conv(u, cache["conv"])
        if cache["left"] == -1:
            dt, B, C = self._ssm_inputs(u)
            y, cache["state"], _ = selective_scan(u, self._delta(dt), self._A(), B, C,
                                                  cache["state"])
        else:
            window = torch.cat([cache["window"], u], dim=1)
            cache["window"] = window[:, u.shape[1]:]
            outside = window.shape[1] - u.shape[1] - cache["left"]  # frames older than left
            inputs = F.pad(window[:, outside:], (0, 0, outside, 0)) if outside else window
            dt, B, C = self._ssm_inputs(window)
            y = selective_scan(inputs, self._delta(dt), self._A(), B, C)[0][:, -u.shape[1]:]
        return self.out_proj((y + u * self.D) * F.silu(z))

    def forward_streaming(self, x: torch.Tensor, cache: dict,
                          context: Context | tuple[Context, ...],
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk (B, C, d_model) -> (B, C, d_model), equal to the offline frames (``valid``
        is not needed: the layer is causal and padding comes after a stream's frames).

        ``context``: one pair, or one per stream (their lefts may differ). ``cache`` (updated in
        place): ``conv`` (B, d_inner, d_conv - 1) and either ``state`` (B, d_inner, d_state;
        ``left = -1``) or ``window``: the last SSM inputs, as many as ``cache["max_left"]`` when
        set (a stream that may switch), else as the left context. Each stream scans its chunk
        from a zero state ``left`` frames back: its older window inputs are zeroed, which leaves
        the state at exactly zero until its window starts.
        """
        if "left" in cache:
            return self._fixed_window_step(x, cache)
        lefts = [left for left, _ in ((context,) if isinstance(context[0], int) else context)]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, cache["conv"] = self._conv(u, cache.get("conv"))
        if lefts[0] == -1:
            y, cache["state"] = self._scan(u, *self._ssm_inputs(u), cache.get("state"))
        else:
            keep = cache.get("max_left", lefts[0])
            past = cache.get("window")
            window = u if past is None else torch.cat([past, u], dim=1)
            cache["window"] = window[:, max(0, window.shape[1] - keep):] if keep else None
            window = window[:, max(0, window.shape[1] - max(lefts) - u.shape[1]):]
            cached = window.shape[1] - u.shape[1]
            inputs = window
            if min(lefts) < cached:
                first = cached - torch.tensor(lefts, device=u.device).clamp(max=cached)
                outside = torch.arange(window.shape[1], device=u.device)[None] < first[:, None]
                inputs = window.masked_fill(outside[..., None], 0.0)
            y = self._scan(inputs, *self._ssm_inputs(window))[0][:, -u.shape[1]:]
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))
