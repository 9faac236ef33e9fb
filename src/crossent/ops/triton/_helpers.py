# Device helpers shared by the kernel files (Triton JIT functions, inlined into the callers).
# - reads: nothing from memory; pure functions of their arguments.
# - writes: nothing.
# - assumes: floating inputs already in the compute dtype (float32, or float64 for float64 data).
"""Small Triton device functions: soft-capping and a dot product that also runs interpreted."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh_series(a):
    """tanh(a) for 0 <= a < 1/8, by its odd Taylor series to ``a**11`` (see softcap_tanh)."""
    a2 = a * a
    # tanh(a) = a - a^3/3 + 2a^5/15 - 17a^7/315 + 62a^9/2835 - 1382a^11/155925 + ...
    poly = -1382.0 / 155925.0
    poly = poly * a2 + 62.0 / 2835.0
    poly = poly * a2 - 17.0 / 315.0
    poly = poly * a2 + 2.0 / 15.0
    poly = poly * a2 - 1.0 / 3.0
    return a + a * a2 * poly


@triton.jit
def softcap_tanh(x, cap):
    """``cap * tanh(x / cap)`` (Gemma 2 final-logit soft-capping), elementwise.

    Triton's core language has no ``tanh`` (libdevice has one, but the interpreter cannot run
    it), so it is built from ``exp``: ``tanh(a) = (1 - e) / (1 + e)`` with ``e = exp(-2|a|)``,
    sign restored afterwards. That form loses relative precision as ``a -> 0`` (``1 - e``
    cancels), so below ``|a| < 1/8`` the odd Taylor series to ``a**11`` is used instead; its
    truncation error there is under 1e-13 relative. ``tanh(±inf) = ±1`` and NaN propagates.
    """
    y = x / cap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    t_far = (1.0 - e) / (1.0 + e)
    t_near = _tanh_series(a)  # its own statement: inside the where() it alters the sm_90 code
    t = tl.where(a < 0.125, t_near, t_far)
    t = tl.where(y < 0, -t, t)
    return cap * t


@triton.jit
def softcap_slope(x, cap):
    """d/dx [cap * tanh(x / cap)] = sech(x / cap)**2, without cancellation.

    ``1 - tanh**2`` loses the relative precision of the slope where tanh is near ±1 (at
    |x/cap| = 4 one ulp of tanh is 1e-4 of the slope). Instead, with ``e = exp(-2|a|)``:
    ``sech(a)**2 = 4e / (1 + e)**2``; near 0, where ``tanh**2`` is small, ``1 - tanh**2`` with
    the series of :func:`softcap_tanh` is exact to rounding.
    """
    a = tl.abs(x / cap)
    e = tl.exp(-2.0 * a)
    one_plus_e = 1.0 + e
    slope_far = 4.0 * e / (one_plus_e * one_plus_e)
    t_near = _tanh_series(a)
    return tl.where(a < 0.125, 1.0 - t_near * t_near, slope_far)


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` with the accumulator's precision.

    UPCAST: compute on float32 copies of the operands. Used for bfloat16 under Triton's
        interpreter, whose ``tl.dot`` multiplies the raw bit patterns of bfloat16 operands
        (triton-lang/triton#11584). bfloat16 -> float32 is exact and so are the products, so this
        computes what the tensor cores compute, up to the order of the fp32 additions.
    IEEE: exact float32 products (``input_precision="ieee"``), to match torch's float32 matmul;
        Triton's default for float32 operands on NVIDIA GPUs is TF32 (10-bit mantissa).
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
