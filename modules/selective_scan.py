"""Selective scan (Mamba-1 SSM) in pure PyTorch, with initial and final states.

``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t`` and ``y_t = C_t . h_t`` (per channel d
and state n). mamba-ssm's fused Mamba-1 kernel has no initial state; streaming and state windows
need one, so this module carries it in and out.

Written by hand because no maintained package offers a CPU/MPS scan with state in/out and
bounded memory: time is cut into blocks small enough to stay in cache; inside a block, chunks of
frames are scanned side by side (one Python step per frame of a chunk, not per frame of the
sequence) and then linked by their carried-in states. The backward pass is a custom autograd
function that recomputes each block from its saved starting state, so memory grows with
``B * L * (D + N)``, not with ``B * L * D * N``.
"""
from __future__ import annotations

import torch

BLOCK_FRAMES = 32   # frames per block: its (B, block, D, N) tensors stay in cache
CHUNK_FRAMES = 8    # frames per chunk inside a block: one Python step per chunk position


def _linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor,
                 chunk: int = CHUNK_FRAMES) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` along dim 1 of (B, T, D, N) tensors, ``h_{-1} = h0``."""
    batch, frames, dim, state = b.shape
    pad = -frames % chunk
    if pad:  # a = 1, b = 0 leave the state unchanged
        a = torch.cat([a, a.new_ones(batch, pad, dim, state)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, dim, state)], dim=1)
    chunks = a.shape[1] // chunk
    a = a.view(batch, chunks, chunk, dim, state)
    b = b.view(batch, chunks, chunk, dim, state)
    h = torch.empty_like(b)
    h[:, :, 0] = b[:, :, 0]
    for k in range(1, chunk):  # every chunk at once, from a zero state
        torch.addcmul(b[:, :, k], a[:, :, k], h[:, :, k - 1], out=h[:, :, k])
    decay = a.cumprod(dim=2)  # within each chunk: a_1 * ... * a_k
    starts = torch.empty_like(h[:, :, 0])
    carry = h0
    for c in range(chunks):  # link chunks: state entering each chunk
        starts[:, c] = carry
        carry = torch.addcmul(h[:, c, -1], decay[:, c, -1], carry)
    h.addcmul_(decay, starts.unsqueeze(2))
    return h.view(batch, -1, dim, state)[:, :frames]


def _block_terms(u, delta, A, B):
    """Decay ``a`` and input ``b`` of one block, each (B, T, D, N)."""
    # Operand order matters on CPU: (D, N) * (..., D, 1) is ~10x faster than the reverse.
    a = torch.exp(A * delta.unsqueeze(-1))
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    return a, b


def _picked(start: int, stop: int, stride: int, offset: int) -> torch.Tensor:
    """Positions in ``[start, stop)`` congruent to ``offset`` modulo ``stride``, block-relative."""
    first = start + (offset - start) % stride
    return torch.tensor(range(first - start, stop - start, stride), dtype=torch.long)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, stride, offset):
        outputs, starts, picked = [], [], []
        state = h0
        for start in range(0, u.shape[1], BLOCK_FRAMES):
            part = slice(start, start + BLOCK_FRAMES)
            a, b = _block_terms(u[:, part], delta[:, part], A, B[:, part])
            starts.append(state)
            h = _linear_scan(a, b, state)
            state = h[:, -1]
            outputs.append((h * C[:, part].unsqueeze(2)).sum(-1))
            if stride:
                picked.append(h[:, _picked(start, start + h.shape[1], stride, offset)])
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts, dim=1))
        ctx.stride, ctx.offset = stride, offset
        states = torch.cat(picked, dim=1) if stride else state.new_zeros(0)
        return torch.cat(outputs, dim=1), state.clone(), states

    @staticmethod
    def backward(ctx, grad_y, grad_state, grad_states):
        u, delta, A, B, C, starts = ctx.saved_tensors
        grads = {name: torch.zeros_like(t) for name, t in
                 (("u", u), ("delta", delta), ("B", B), ("C", C))}
        grad_A = torch.zeros_like(A)
        carry = grad_state.clone()  # d loss / d h at the end of the block being processed
        picked_end = grad_states.shape[1] if ctx.stride else 0
        for index in reversed(range(starts.shape[1])):
            start = index * BLOCK_FRAMES
            part = slice(start, start + BLOCK_FRAMES)
            u_, delta_, B_, C_, dy = u[:, part], delta[:, part], B[:, part], C[:, part], grad_y[:, part]
            a, b = _block_terms(u_, delta_, A, B_)
            h = _linear_scan(a, b, starts[:, index])
            # Adjoint: g_t = C_t dy_t (+ d loss / d h_t if h_t was returned) + a_{t+1} g_{t+1},
            # run as a forward scan on flipped time.
            q = dy.unsqueeze(-1) * C_.unsqueeze(2)
            if ctx.stride:
                where = _picked(start, start + h.shape[1], ctx.stride, ctx.offset)
                q[:, where] += grad_states[:, picked_end - len(where):picked_end]
                picked_end -= len(where)
            a_next = torch.cat([a[:, 1:], a.new_ones(a[:, :1].shape)], dim=1)
            g = _linear_scan(a_next.flip(1), q.flip(1), carry).flip(1)
            h_prev = torch.cat([starts[:, index].unsqueeze(1), h[:, :-1]], dim=1)
            grad_log_a = g * h_prev * a  # d loss / d (delta * A)
            g_B = (g * B_.unsqueeze(2)).sum(-1)
            grads["u"][:, part] = g_B * delta_
            grads["delta"][:, part] = (grad_log_a * A).sum(-1) + g_B * u_
            grads["B"][:, part] = torch.einsum("btdn,btd->btn", g, delta_ * u_)
            grads["C"][:, part] = torch.einsum("btdn,btd->btn", h, dy)
            grad_A += torch.einsum("btdn,btd->dn", grad_log_a, delta_)
            carry = a[:, 0] * g[:, 0]
        return (grads["u"], grads["delta"], grad_A, grads["B"], grads["C"], carry, None, None)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, initial_state: torch.Tensor | None = None,
                   state_stride: int = 0, state_offset: int = 0):
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

    Returns
    -------
    y : (B, L, D), the final state (B, D, N), and the requested states (B, K, D, N).
    """
    dtype = u.dtype  # half precision (autocast) is scanned in float32
    scan_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    u, delta, A, B, C = (t.to(scan_dtype) for t in (u, delta, A, B, C))
    if initial_state is None:
        initial_state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    y, state, states = _SelectiveScan.apply(u, delta, A, B, C, initial_state.to(scan_dtype),
                                            state_stride, state_offset)
    return y.to(dtype), state, states


def selective_scan_sequential(u, delta, A, B, C, initial_state=None):
    """Reference: one Python step per frame (plain autograd); returns y and the final state."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if initial_state is None else initial_state
    outputs = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(A * delta_t.unsqueeze(-1)) * h + (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)
        outputs.append((h * C_t.unsqueeze(1)).sum(-1))
    return torch.stack(outputs, dim=1), h
