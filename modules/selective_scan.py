"""Selective scan (Mamba-1 SSM) with initial and final states: a compiled CPU kernel and an eager
chunked scan for any device.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t`` and ``y_t = C_t . h_t`` (per channel d
and state n). mamba-ssm's fused Mamba-1 kernel has no initial state; streaming and state windows
need one, so both scans carry it in and out. Written by hand because no maintained package offers
a CPU/MPS scan with state in/out and bounded memory. Both save only a state every block of frames
and recompute the block in the backward pass, so memory grows with ``B * L * D``, not with
``B * L * D * N``.

- ``compiled`` (CPU with a C++ compiler): ``selective_scan_cpu.cpp``, compiled on first use
  (about 2 s) into a cache folder and called through ctypes. Each thread runs the loop over time
  for a batch row and 16 channels with the state held in cache, so the ``(B, L, D, N)`` decays
  never reach memory. Needs ``delta >= 0`` and ``A <= 0``.
- ``chunked`` (any device, eager PyTorch): chunks of frames are scanned side by side (one Python
  step per frame of a chunk, not per frame of the sequence), then linked by their carried-in
  states.

``window_correction`` (both ways) is the part of a chunk-limited scan that removes the state from
before each chunk's window (``Mamba._windowed_scan``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

CHUNKED_BLOCK_FRAMES = 32   # CPU: its (B, block, D, N) tensors stay in cache
CHUNK_FRAMES = 8            # frames per chunk inside a block: one Python step per chunk position
# GPU / MPS: blocks as long as ACCELERATOR_BLOCK_ELEMENTS allows for one (B, block, D, N) tensor
# (fewer, larger kernels), at most ACCELERATOR_MAX_BLOCK_FRAMES frames.
ACCELERATOR_BLOCK_ELEMENTS = 2 ** 26
ACCELERATOR_MAX_BLOCK_FRAMES = 512
KERNEL_SOURCE = Path(__file__).with_name("selective_scan_cpu.cpp")


def _block_frames(u: torch.Tensor, state: int) -> int:
    """Frames per block of the chunked scan (a multiple of CHUNK_FRAMES)."""
    if u.device.type == "cpu":
        return CHUNKED_BLOCK_FRAMES
    per_frame = u.shape[0] * u.shape[2] * state
    frames = min(ACCELERATOR_MAX_BLOCK_FRAMES, max(1, ACCELERATOR_BLOCK_ELEMENTS // per_frame))
    return max(CHUNK_FRAMES, frames // CHUNK_FRAMES * CHUNK_FRAMES)


# ----------------------------------------------------------------- chunked blocks
def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` along dim 1 of (B, T, D, N) tensors, ``h_{-1} = h0``.

    T must be a multiple of CHUNK_FRAMES.
    """
    batch, frames, dim, state = b.shape
    chunks = frames // CHUNK_FRAMES
    a = a.view(batch, chunks, CHUNK_FRAMES, dim, state)
    b = b.view(batch, chunks, CHUNK_FRAMES, dim, state)
    if torch.compiler.is_compiling():  # the same products, without out= into strided slices
        steps = [b[:, :, 0]]
        for k in range(1, CHUNK_FRAMES):
            steps.append(torch.addcmul(b[:, :, k], a[:, :, k], steps[-1]))
        h = torch.stack(steps, dim=2)
    else:
        h = torch.empty_like(b)
        h[:, :, 0] = b[:, :, 0]
        for k in range(1, CHUNK_FRAMES):  # every chunk at once, from a zero state
            torch.addcmul(b[:, :, k], a[:, :, k], h[:, :, k - 1], out=h[:, :, k])
    decay = a.cumprod(dim=2)  # within each chunk: a_1 * ... * a_k
    starts = torch.empty_like(h[:, :, 0])
    carry = h0
    for c in range(chunks):  # link chunks: state entering each chunk
        starts[:, c] = carry
        carry = torch.addcmul(h[:, c, -1], decay[:, c, -1], carry)
    h.addcmul_(decay, starts.unsqueeze(2))
    return h.view(batch, frames, dim, state)


def _block_terms(u, delta, A, B):
    """Decay ``a`` and input ``b`` of one block, each (B, T, D, N)."""
    # Operand order matters on CPU: (D, N) * (..., D, 1) is ~10x faster than the reverse.
    a = torch.exp(A * delta.unsqueeze(-1))
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    return a, b


def _chunked_forward(u, delta, A, B, C, h0, keep_states: bool):
    """One block: y (B, T, D), final state (B, D, N), every state (B, T, D, N) or None."""
    a, b = _block_terms(u, delta, A, B)
    h = _linear_scan(a, b, h0)
    y = (h * C.unsqueeze(2)).sum(-1)
    return y, h[:, -1], (h if keep_states else None)


def _chunked_backward(u, delta, A, B, C, h0, grad_y, grad_end, grad_states):
    """Gradients of one block from the gradient at its end state; see ``_ChunkedScan``."""
    a, b = _block_terms(u, delta, A, B)
    h = _linear_scan(a, b, h0)
    # Adjoint: g_t = C_t dy_t (+ d loss / d h_t if h_t was returned) + a_{t+1} g_{t+1},
    # run as a forward scan on flipped time.
    q = grad_y.unsqueeze(-1) * C.unsqueeze(2)
    if grad_states is not None:
        q = q + grad_states
    a_next = torch.cat([a[:, 1:], a.new_ones(a[:, :1].shape)], dim=1)
    g = _linear_scan(a_next.flip(1), q.flip(1), grad_end).flip(1)
    h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
    grad_log_a = g * h_prev * a  # d loss / d (delta * A)
    g_B = (g * B.unsqueeze(2)).sum(-1)
    return (g_B * delta, (grad_log_a * A).sum(-1) + g_B * u,
            torch.einsum("btdn,btd->dn", grad_log_a, delta),
            torch.einsum("btdn,btd->btn", g, delta * u),
            torch.einsum("btdn,btd->btn", h, grad_y), a[:, 0] * g[:, 0])


class _ChunkedScan(torch.autograd.Function):
    """Blocks of CHUNKED_BLOCK_FRAMES, each recomputed from its starting state in the backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, stride, offset):
        block = _block_frames(u, A.shape[1])
        outputs, starts, picked = [], [], []
        state = h0
        for start in range(0, u.shape[1], block):
            part = slice(start, start + block)
            starts.append(state)
            y, state, states = _chunked_forward(u[:, part], delta[:, part], A, B[:, part],
                                                C[:, part], state, bool(stride))
            outputs.append(y)
            if stride:
                picked.append(states[:, _picked(start, stride, offset)])
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts, dim=1))
        ctx.stride, ctx.offset, ctx.block = stride, offset, block
        states = torch.cat(picked, dim=1) if stride else state.new_zeros(0)
        return torch.cat(outputs, dim=1), state.clone(), states

    @staticmethod
    def backward(ctx, grad_y, grad_state, grad_states):
        u, delta, A, B, C, starts = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (u, delta, B, C)]
        grad_A = torch.zeros_like(A)
        carry = grad_state.clone()  # d loss / d h at the end of the block being processed
        picked_end = grad_states.shape[1] if ctx.stride else 0
        for index in reversed(range(starts.shape[1])):
            start = index * ctx.block
            part = slice(start, start + ctx.block)
            frames = u[:, part].shape[1]
            block_states = None
            if ctx.stride:  # gradients of the returned states, at their frames of this block
                block_states = grad_y.new_zeros(u.shape[0], frames, u.shape[2], A.shape[1])
                where = block_states[:, _picked(start, ctx.stride, ctx.offset)]
                where.copy_(grad_states[:, picked_end - where.shape[1]:picked_end])
                picked_end -= where.shape[1]
            du, ddelta, dA, dB, dC, carry = _chunked_backward(
                u[:, part], delta[:, part], A, B[:, part], C[:, part], starts[:, index],
                grad_y[:, part], carry, block_states)
            for grad, value in zip(grads, (du, ddelta, dB, dC)):
                grad[:, part] = value
            grad_A += dA
        return (*grads[:2], grad_A, *grads[2:], carry, None, None)


def _picked(start: int, stride: int, offset: int) -> slice:
    """Frames ``t`` of the block starting at ``start`` with ``t % stride == offset``, as a
    block-relative slice (a view: no index tensor to copy to the device)."""
    return slice((offset - start) % stride, None, stride)


# ---------------------------------------------------------------- compiled kernel
def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (path for path in map(shutil.which, ("g++", "clang++", "c++")) if path), None)


def _build_kernel() -> Path:
    """Compile ``selective_scan_cpu.cpp`` for this CPU unless a cached build exists."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    # -march=native: the build is only valid on this kind of machine, so the host is in the key.
    key = hashlib.sha256("\0".join([KERNEL_SOURCE.read_text(), compiler, *flags, platform.node(),
                                     platform.machine()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streaming-ssl"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir())
    target = cache / f"selective_scan_cpu-{key}.so"
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    # Some compilers lack -march=native (clang on ARM) or OpenMP (Apple clang: the kernel then
    # starts its own threads). With OpenMP, the kernel links libgomp.so.1, which resolves to the
    # copy torch has loaded: both share one thread pool instead of competing for the cores.
    for extra in (["-march=native", "-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp"],
                  ["-fopenmp-simd"]):
        result = subprocess.run([compiler, *extra, *flags, str(KERNEL_SOURCE), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(partial, target)  # atomic: parallel processes never load a partial file
            return target
    raise RuntimeError(f"{compiler} failed: {(result.stderr or result.stdout).strip()}")


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when it cannot be built or loaded."""
    try:
        kernel = ctypes.CDLL(str(_build_kernel()))
        kernel.scan_tile.restype = kernel.scan_block.restype = ctypes.c_int64
        return kernel
    except (OSError, RuntimeError, AttributeError) as error:
        logger.warning("the compiled selective scan is unavailable, using the chunked scan: %s",
                       str(error).splitlines()[0])
        return None


def compiled_scan_available(device: torch.device | str) -> bool:
    """Whether ``compiled=True`` can be used here: CPU tensors and a kernel that builds."""
    return torch.device(device).type == "cpu" and _kernel() is not None


def _run_kernel(name: str, tensors: list, sizes: list) -> None:
    """Call ``<name>_<f32|f64>`` with the tensors' data pointers and the sizes."""
    suffix = {torch.float32: "f32", torch.float64: "f64"}[tensors[0].dtype]
    assert all(t.is_contiguous() and t.dtype == tensors[0].dtype for t in tensors)
    pointers = [ctypes.c_void_p(t.data_ptr() if t.numel() else None) for t in tensors]
    getattr(_kernel(), f"{name}_{suffix}")(*pointers, *map(ctypes.c_int64, sizes))


def _check_compiled(device: torch.device, steps: torch.Tensor, A: torch.Tensor,
                    shapes: dict[str, tuple[torch.Tensor, tuple]]) -> None:
    """The kernel runs on CPU, reads raw memory of the shapes given as ``{name: (tensor,
    shape)}``, and assumes decays exp(steps * A) <= 1."""
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if not compiled_scan_available(device):
        raise RuntimeError(f"the compiled scan needs CPU tensors (got {device.type}) and a C++ "
                           "compiler (see the warning logged); use compiled=False")
    if steps.numel() and (bool(steps.detach().min() < 0) or bool(A.detach().max() > 0)):
        raise ValueError("the compiled scan needs delta >= 0 and A <= 0 (decays exp(delta * A) "
                         "<= 1, as softplus(dt) and -exp(A_log) give); use compiled=False")


class _CompiledScan(torch.autograd.Function):
    """The kernel's forward and backward; D a multiple of its tile, contiguous inputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, stride, first, backward_needed):
        batch, length, dim = u.shape
        A_t = A.t().contiguous()
        y, final = torch.empty_like(u), torch.empty_like(h0)
        blocks = -(-length // _kernel().scan_block()) if backward_needed else 0
        checkpoints = u.new_empty(batch, blocks, A.shape[1], dim)
        states = u.new_empty(batch, len(range(first, length, stride)) if stride else 0,
                             A.shape[1], dim)  # (N, D) each: the kernel's layout
        sizes = [batch, length, dim, A.shape[1], stride, first, torch.get_num_threads()]
        _run_kernel("scan_forward", [u, delta, A_t, B, C, h0, y, final, checkpoints, states],
                    sizes)
        ctx.save_for_backward(u, delta, A_t, B, C, checkpoints)
        ctx.sizes = sizes
        return y, final, states

    @staticmethod
    def backward(ctx, grad_y, grad_final, grad_states):
        u, delta, A_t, B, C, checkpoints = ctx.saved_tensors
        threads = ctx.sizes[-1]
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(u)
        grad_A = u.new_zeros(threads, *A_t.shape)  # partial sums, one per thread
        grad_B, grad_C = (B.new_zeros(threads, *B.shape) for _ in range(2))
        grad_h0 = torch.empty_like(grad_final)
        _run_kernel("scan_backward", [u, delta, A_t, B, C, checkpoints, grad_y.contiguous(),
                                 grad_final.contiguous(), grad_states.contiguous(), grad_u,
                                 grad_delta, grad_A, grad_B, grad_C, grad_h0], ctx.sizes)
        return (grad_u, grad_delta, grad_A.sum(0).t(), grad_B.sum(0), grad_C.sum(0), grad_h0,
                None, None, None)


def _compiled_scan(u, delta, A, B, C, h0, stride: int, offset: int):
    """``_CompiledScan`` on any D: channels padded to the tile (delta = 0: the state stays 0)."""
    (batch, frames, dim), state = u.shape, A.shape[-1]
    _check_compiled(u.device, delta, A, {
        "delta": (delta, u.shape), "A": (A, (dim, state)), "B": (B, (batch, frames, state)),
        "C": (C, (batch, frames, state)), "initial_state": (h0, (batch, dim, state))})
    pad = -dim % _kernel().scan_tile()
    if pad:
        u, delta = (torch.nn.functional.pad(t, (0, pad)) for t in (u, delta))
        A, h0 = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (A, h0))
    inputs = [t.contiguous() for t in (u, delta, A, B, C, h0)]
    backward_needed = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    y, final, states = _CompiledScan.apply(*inputs, stride, offset % stride if stride else 0,
                                           backward_needed)
    if pad:  # (a slice of every output would cost a full-size gradient copy in the backward)
        y, final, states = y[..., :dim], final[:, :dim], states[..., :dim]
    return y, final, states.transpose(2, 3)


class _CompiledCorrection(torch.autograd.Function):
    """The kernel's window correction; D a multiple of its tile, contiguous inputs."""

    @staticmethod
    def forward(ctx, span, A, C, states, chunk, first):
        batch, frames, dim = span.shape
        A_t = A.t().contiguous()
        corr = torch.empty_like(span)
        sizes = [batch, frames, dim, A.shape[1], chunk, first, states.shape[1],
                 torch.get_num_threads()]
        _run_kernel("correction_forward", [span, A_t, C, states, corr], sizes)
        ctx.save_for_backward(span, A_t, C, states)
        ctx.sizes = sizes
        return corr

    @staticmethod
    def backward(ctx, grad_corr):
        span, A_t, C, states = ctx.saved_tensors
        grad_span, grad_C, grad_states = (torch.empty_like(t) for t in (span, C, states))
        chunk, first = ctx.sizes[4:6]
        used = range(first, first - (-span.shape[1] // chunk))  # the kernel writes these
        grad_states[:, :used.start] = grad_states[:, used.stop:] = 0
        grad_A = span.new_zeros(ctx.sizes[-1], *A_t.shape)  # partial sums, one per thread
        _run_kernel("correction_backward", [span, A_t, C, states, grad_corr.contiguous(),
                                            grad_span, grad_A, grad_C, grad_states], ctx.sizes)
        return grad_span, grad_A.sum(0).t(), grad_C, grad_states, None, None


def _correction_block(span, A, C, states, chunk: int) -> torch.Tensor:
    """``window_correction`` of whole chunks in eager PyTorch (``states``: one per chunk)."""
    H = states.repeat_interleave(chunk, dim=1)[:, :span.shape[1]]
    return (torch.exp(A * span.unsqueeze(-1)) * H * C.unsqueeze(2)).sum(-1)


def _eager_correction(span, A, C, states, chunk: int) -> torch.Tensor:
    """Blocks of whole chunks, each recomputed in the backward pass (``checkpoint``): one block's
    (B, frames, D, N) tensors exist at a time, and none is kept for the backward pass."""
    frames = span.shape[1]
    block = chunk * max(1, _block_frames(span, A.shape[1]) // chunk)
    parts = []
    for start in range(0, frames, block):
        end = min(start + block, frames)
        parts.append(checkpoint(_correction_block, span[:, start:end], A, C[:, start:end],
                                states[:, start // chunk:-(-end // chunk)], chunk,
                                use_reentrant=False))
    return torch.cat(parts, dim=1)


def window_correction(span: torch.Tensor, A: torch.Tensor, C: torch.Tensor, states: torch.Tensor,
                      chunk: int, first_state: int = 0, compiled: bool = False) -> torch.Tensor:
    """The pre-window state of chunk-limited scans, decayed to each frame and read out by C.

    ``corr[b, t, d] = sum_n C[b, t, n] exp(A[d, n] span[b, t, d]) states[b, k, d, n]`` with
    ``k = first_state + t // chunk``.

    Arguments
    ---------
    span : (B, T, D) step sizes summed since each chunk's window start (>= 0 when compiled).
    A : (D, N) state matrix (<= 0 when compiled).
    C : (B, T, N) output projections.
    states : (B, K, D, N) states at the chunks' window starts, as ``selective_scan`` returns them.
    chunk : frames per chunk.
    first_state : the state of the first chunk.
    compiled : fused CPU kernel (no ``(B, T, D, N)`` tensors); False: eager PyTorch, in blocks
        recomputed in the backward pass.

    Returns
    -------
    corr : (B, T, D).
    """
    (batch, frames, dim), state = span.shape, A.shape[-1]
    used = slice(first_state, first_state - (-frames // chunk))
    if first_state < 0:
        raise ValueError(f"first_state must be >= 0, got {first_state}")
    if not compiled:
        return _eager_correction(span, A, C, states[:, used], chunk)
    _check_compiled(span.device, span, A, {
        "A": (A, (dim, state)), "C": (C, (batch, frames, state)),
        f"states[:, {used.start}:{used.stop}]": (states[:, used],
                                                  (batch, used.stop - used.start, dim, state))})
    native = states.transpose(2, 3)  # (B, K, N, D): the kernel's layout, a view of its output
    pad = -dim % _kernel().scan_tile()
    if pad:  # A = 0 and states = 0 on padded channels: their correction is 0
        span, native = (torch.nn.functional.pad(t, (0, pad)) for t in (span, native))
        A = torch.nn.functional.pad(A, (0, 0, 0, pad))
    corr = _CompiledCorrection.apply(*(t.contiguous() for t in (span, A, C, native)), chunk,
                                     first_state)
    return corr[..., :dim] if pad else corr


# --------------------------------------------------------------- the scan
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, initial_state: torch.Tensor | None = None,
                   state_stride: int = 0, state_offset: int = 0, compiled: bool = False):
    """The SSM part of Mamba-1, without the skip ``D * u`` and the gate.

    Arguments
    ---------
    u : (B, L, D) input.
    delta : (B, L, D) step sizes (after softplus).
    A : (D, N) state matrix (negative).
    B, C : (B, L, N) input and output projections.
    initial_state : (B, D, N) state before the first frame (None: zeros).
    state_stride, state_offset : also return the states after frames ``t`` with
        ``t % state_stride == state_offset`` (0: none).
    compiled : use the compiled CPU kernel (see ``compiled_scan_available``; needs
        ``delta >= 0`` and ``A <= 0``, as in Mamba); False: the eager chunked scan.

    Returns
    -------
    y : (B, L, D), the final state (B, D, N), and the requested states (B, K, D, N).
    """
    dtype = u.dtype  # half precision (autocast) is scanned in float32
    scan_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u, delta, A, B, C = (t.to(scan_dtype) for t in (u, delta, A, B, C))
    if initial_state is None:
        initial_state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    initial_state = initial_state.to(scan_dtype)
    if compiled:
        y, state, states = _compiled_scan(u, delta, A, B, C, initial_state, state_stride,
                                          state_offset)
        return y.to(dtype), state, states
    frames = u.shape[1]
    pad = -frames % CHUNK_FRAMES  # whole chunks
    if pad:  # delta = 0 and u = 0 leave the state unchanged: decay 1, input 0
        u, delta, B, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (u, delta, B, C))
    y, state, states = _ChunkedScan.apply(u, delta, A, B, C, initial_state, state_stride,
                                          state_offset)
    if state_stride:  # states of padding frames repeat the final state
        states = states[:, :len(range(state_offset % state_stride, frames, state_stride))]
    return y[:, :frames].to(dtype), state, states


def selective_scan_sequential(u, delta, A, B, C, initial_state=None):
    """Reference: one Python step per frame (plain autograd); returns y and the final state."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if initial_state is None else initial_state
    outputs = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(A * delta_t.unsqueeze(-1)) * h + (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)
        outputs.append((h * C_t.unsqueeze(1)).sum(-1))
    return torch.stack(outputs, dim=1), h
