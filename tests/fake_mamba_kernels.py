"""Stand-ins for mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn`` on CPU.

They compute what the CUDA kernels compute (mamba-ssm's ``selective_scan_ref`` semantics) and
refuse, with the kernels' own checks (``csrc/selective_scan/selective_scan.cpp``,
``csrc/causal_conv1d.cpp``), the dtype and layout combinations the kernels refuse, so that the
fused code path of ``modules.mamba`` can be tested where CUDA is absent.
"""
import torch
import torch.nn.functional as F

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
calls = {"scan": 0, "conv": 0}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"fused kernel check failed: {message}")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """u, delta (batch, dim, L); A (dim, N); B, C (batch, N, L)."""
    calls["scan"] += 1
    _check(u.dtype in FLOATS, "u must be float32, float16 or bfloat16")
    _check(A.dtype == torch.float32, "A must be float32")
    for name, t in (("delta", delta), ("B", B), ("C", C)) + ((("z", z),) if z is not None else ()):
        _check(t.dtype == u.dtype, f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
        _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name} must be contiguous in time")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        _check(t is None or t.dtype == torch.float32, f"{name} must be float32")
    delta = delta.float() + (0 if delta_bias is None else delta_bias[:, None])
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for i in range(u.shape[2]):
        h = (torch.exp(delta[:, :, i, None] * A) * h
             + (delta[:, :, i] * u[:, :, i].float())[..., None] * B[:, None, :, i].float())
        ys.append((h * C[:, None, :, i].float()).sum(-1))
    y = torch.stack(ys, 2)
    if D is not None:
        y = y + u.float() * D[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """x (batch, dim, L); weight (dim, width); output in x's dtype."""
    calls["conv"] += 1
    _check(x.dtype in FLOATS and weight.dtype in FLOATS, "x and weight must be float types")
    _check(bias is None or bias.dtype == weight.dtype, "bias must have weight's dtype")
    width = weight.shape[1]
    out = F.conv1d(x.float(), weight.float()[:, None], None if bias is None else bias.float(),
                   padding=width - 1, groups=x.shape[1])[..., :x.shape[2]]
    return (F.silu(out) if activation in ("silu", "swish") else out).to(x.dtype)
