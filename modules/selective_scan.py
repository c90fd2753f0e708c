"""Selective scan (Mamba-1 SSM) in pure PyTorch, with initial and final states.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t`` and ``y_t = C_t . h_t`` (per channel d
and state n). mamba-ssm's fused Mamba-1 kernel has no initial state; streaming and state windows
need one, so this module carries it in and out.

Written by hand because no maintained package offers a CPU/MPS scan with state in/out and
bounded memory. Time is cut into blocks; a custom autograd function keeps only each block's
starting state and recomputes the block in the backward pass, so memory grows with
``B * L * (D + N)``, not with ``B * L * D * N``. Two ways to scan a block:

- ``chunked`` (any device, eager): chunks of frames are scanned side by side (one Python step
  per frame of a chunk, not per frame of the sequence), then linked by their carried-in states.
- ``compiled`` (CPU with a C++ compiler): the block is written frame by frame and compiled by
  ``torch.compile``; Inductor fuses the frames into one loop nest per block, so the
  ``(B, T, D, N)`` decays and inputs are computed in registers instead of memory. Compiled once
  per shape and dtype (about 20 s on 2 cores, then cached on disk by Inductor); if compiling
  fails, a warning is logged once and the chunked scan takes over.
"""
from __future__ import annotations

import functools
import logging
import shutil

import torch

logger = logging.getLogger(__name__)

CHUNKED_BLOCK_FRAMES = 32   # its (B, block, D, N) tensors stay in cache
CHUNK_FRAMES = 8            # frames per chunk inside a block: one Python step per chunk position
COMPILED_BLOCK_FRAMES = 16  # frames unrolled in one compiled block


# ----------------------------------------------------------------- chunked blocks
def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` along dim 1 of (B, T, D, N) tensors, ``h_{-1} = h0``.

    T must be a multiple of CHUNK_FRAMES.
    """
    batch, frames, dim, state = b.shape
    chunks = frames // CHUNK_FRAMES
    a = a.view(batch, chunks, CHUNK_FRAMES, dim, state)
    b = b.view(batch, chunks, CHUNK_FRAMES, dim, state)
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
    """Gradients of one block from the gradient at its end state; see ``_SelectiveScan``."""
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


# ---------------------------------------------------------------- compiled blocks
def _unrolled_forward(u, delta, A, B, C, h, keep_states: bool):
    """``_chunked_forward`` written frame by frame, for Inductor to fuse."""
    outputs, states = [], []
    for k in range(u.shape[1]):
        h = (torch.exp(A * delta[:, k, :, None]) * h
             + (delta[:, k] * u[:, k])[:, :, None] * B[:, k, None, :])
        outputs.append((h * C[:, k, None, :]).sum(-1))
        states.append(h)
    return torch.stack(outputs, 1), h, (torch.stack(states, 1) if keep_states else None)


def _unrolled_backward(u, delta, A, B, C, h, grad_y, g, grad_states):
    """``_chunked_backward`` written frame by frame, for Inductor to fuse."""
    before, decays = [], []
    for k in range(u.shape[1]):  # recompute the states
        before.append(h)
        decays.append(torch.exp(A * delta[:, k, :, None]))
        h = decays[k] * h + (delta[:, k] * u[:, k])[:, :, None] * B[:, k, None, :]
    after = before[1:] + [h]
    grads = [[] for _ in range(4)]
    grad_A = torch.zeros_like(h)  # summed over the batch at the end: pointwise in the loop
    for k in reversed(range(u.shape[1])):
        g = g + grad_y[:, k, :, None] * C[:, k, None, :]
        if grad_states is not None:
            g = g + grad_states[:, k]
        grad_log_a = g * before[k] * decays[k]
        g_B = (g * B[:, k, None, :]).sum(-1)
        grads[0].append(g_B * delta[:, k])
        grads[1].append((grad_log_a * A).sum(-1) + g_B * u[:, k])
        grad_A = grad_A + grad_log_a * delta[:, k, :, None]
        grads[2].append((g * (delta[:, k] * u[:, k])[:, :, None]).sum(1))
        grads[3].append((after[k] * grad_y[:, k, :, None]).sum(1))
        g = g * decays[k]
    du, ddelta, dB, dC = (torch.stack(x[::-1], 1) for x in grads)
    return du, ddelta, grad_A.sum(0), dB, dC, g


@functools.cache
def _compiled(function):
    return torch.compile(function, fullgraph=True)


_BLOCK_SCANS = {"forward": (_chunked_forward, _unrolled_forward),
                "backward": (_chunked_backward, _unrolled_backward)}
_compile_failed = False


def _scan_block(direction: str, compiled: bool, *args):
    """One block, forward or backward, compiled or chunked (same numbers, up to rounding)."""
    global _compile_failed
    chunked, unrolled = _BLOCK_SCANS[direction]
    if compiled and not _compile_failed:
        try:
            return _compiled(unrolled)(*args)
        except torch._dynamo.exc.TorchDynamoException as error:  # e.g. no Python headers
            _compile_failed = True
            logger.warning("compiling the selective scan failed, using the chunked scan: %s",
                           str(error).splitlines()[0])
    return chunked(*args)


@functools.cache
def _cpp_compiler_found() -> bool:
    return any(shutil.which(name) for name in ("g++", "clang++", "c++"))


def compiled_scan_available(device: torch.device | str) -> bool:
    """Whether ``compiled=True`` can be used here: CPU tensors and a C++ compiler for Inductor."""
    return torch.device(device).type == "cpu" and _cpp_compiler_found()


# --------------------------------------------------------------- the scan
class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, stride, offset, compiled):
        block = COMPILED_BLOCK_FRAMES if compiled else CHUNKED_BLOCK_FRAMES
        outputs, starts, picked = [], [], []
        state = h0
        for start in range(0, u.shape[1], block):
            part = slice(start, start + block)
            starts.append(state)
            y, state, states = _scan_block("forward", compiled, u[:, part], delta[:, part], A,
                                           B[:, part], C[:, part], state, bool(stride))
            outputs.append(y)
            if stride:
                picked.append(states[:, _picked(start, y.shape[1], stride, offset)])
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts, dim=1))
        ctx.stride, ctx.offset, ctx.compiled, ctx.block = stride, offset, compiled, block
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
                where = _picked(start, frames, ctx.stride, ctx.offset)
                block_states = grad_y.new_zeros(u.shape[0], frames, u.shape[2], A.shape[1])
                block_states[:, where] = grad_states[:, picked_end - len(where):picked_end]
                picked_end -= len(where)
            du, ddelta, dA, dB, dC, carry = _scan_block(
                "backward", ctx.compiled, u[:, part], delta[:, part], A, B[:, part], C[:, part],
                starts[:, index], grad_y[:, part], carry, block_states)
            for grad, value in zip(grads, (du, ddelta, dB, dC)):
                grad[:, part] = value
            grad_A += dA
        return (*grads[:2], grad_A, *grads[2:], carry, None, None, None)


def _picked(start: int, frames: int, stride: int, offset: int) -> torch.Tensor:
    """Frames ``t`` of block ``[start, start + frames)`` with ``t % stride == offset``, block-relative."""
    return torch.tensor(range((offset - start) % stride, frames, stride), dtype=torch.long)


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
    compiled : scan blocks with ``torch.compile`` (see the module docstring and
        ``compiled_scan_available``); False: the eager chunked scan.

    Returns
    -------
    y : (B, L, D), the final state (B, D, N), and the requested states (B, K, D, N).
    """
    dtype = u.dtype  # half precision (autocast) is scanned in float32
    scan_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u, delta, A, B, C = (t.to(scan_dtype) for t in (u, delta, A, B, C))
    if initial_state is None:
        initial_state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    frames = u.shape[1]
    # Compiled blocks all get the same shape (one compilation); chunked ones whole chunks.
    pad = -frames % (COMPILED_BLOCK_FRAMES if compiled else CHUNK_FRAMES)
    if pad:  # delta = 0 and u = 0 leave the state unchanged: decay 1, input 0
        u, delta, B, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (u, delta, B, C))
    y, state, states = _SelectiveScan.apply(u, delta, A, B, C, initial_state.to(scan_dtype),
                                            state_stride, state_offset, compiled)
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
