"""What softmax, log_softmax and logsumexp compute, and their derivatives, as plain JAX.

This module is the one place for the semantics (the -inf, +inf, NaN and fully masked rules). The
primitives in ``_primitives.py`` lower to these functions on every platform where no hand-written
kernel applies, and their differentiation rules are built from the tangent maps here.

The forward formulas contain no ``select`` on the row maximum or the row sum: XLA's GPU softmax
fusion (and the TPU fusions) only fuse a reduce -> broadcast -> elementwise chain whose row values
pass through unary ops or ops with a constant operand, so one select there splits the computation
into several kernels. The rules are obtained arithmetically instead:

* The row maximum is reduced with ``min(max(a, b), finfo.max)`` from ``finfo.min``: it is always
  finite (or NaN), so ``x - shift`` never computes ``inf - inf``. A fully masked slice gets the
  shift ``finfo.min`` and stays -inf; a slice holding +inf gets ``finfo.max``.
* ``exp(min(x - shift, 0))``: a +inf entry contributes exactly 1, so the k +inf entries of a slice
  share the mass (1/k each) and every finite entry gets ``exp(-huge) = 0``.
* The sum is reduced from ``finfo.tiny``: a fully masked slice sums to a positive number and gives
  0 / tiny = 0 (log_softmax: -inf - log(tiny) = -inf), never 0 / 0. Every other slice sums to at
  least 1, which absorbs tiny.
* NaN propagates through max, min, sum and exp, so a NaN slice is NaN and only that slice.

Everything is computed in float32 for sub-32-bit inputs and rounded once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Axes = tuple[int, ...]


def compute_dtype(dtype: Any) -> Any:
    """float32 for sub-32-bit floats (bf16, f16, f8), the dtype itself otherwise."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _keep(reduced: jax.Array, axes: Axes) -> jax.Array:
    return lax.expand_dims(reduced, axes)


def global_sum(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """Sum over ``axes`` (kept) and, inside ``shard_map``, across ``axis_name``."""
    local = jnp.sum(x, axis=axes, keepdims=True)
    return local if axis_name is None else lax.psum(local, axis_name)


def _shift(x: jax.Array, axes: Axes, axis_name: Any, dtype: Any) -> jax.Array:
    """The slice maximum clamped into ``dtype``'s finite range (kept axes), in the compute dtype.

    The maximum is exact in any dtype, so it is usually taken in the input dtype (on TPU an upcast
    before the reduction costs a kernel of its own).
    """
    info = jnp.finfo(dtype)

    def clamped_max(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.minimum(jnp.maximum(a, b), info.max)

    shift = _keep(lax.reduce(x.astype(dtype), info.min, clamped_max, axes), axes)
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    return shift.astype(compute_dtype(x.dtype))


def masked(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``x`` with the entries ``where`` excludes set to -inf."""
    return x if where is None else jnp.where(where, x, jnp.array(-jnp.inf, x.dtype))


def normalize(x: jax.Array, axes: Axes, axis_name: Any, log: bool) -> jax.Array:
    """softmax (``log=False``) or log_softmax of ``x`` over ``axes``; masked entries are -inf."""
    compute = compute_dtype(x.dtype)
    # log_softmax must tell a +inf slice's finite entries apart (they become -inf), which needs
    # the shift at finfo.max of a range wider than theirs: float16 / float8 reduce in float32.
    narrow = jnp.finfo(x.dtype).maxexp < jnp.finfo(compute).maxexp
    shift_dtype = compute if log and narrow else x.dtype
    shifted = jnp.minimum(x.astype(compute) - _shift(x, axes, axis_name, shift_dtype), 0)
    total = _keep(lax.reduce(jnp.exp(shifted), jnp.finfo(compute).tiny, lax.add, axes), axes)
    if axis_name is not None:
        total = lax.psum(total, axis_name)
    if not log:
        return (jnp.exp(shifted) / total).astype(x.dtype)
    # Finite entries of a slice holding +inf sit at about -finfo.max after the shift: -inf, as
    # their probability is 0. (An entry within an ulp of finfo.max there keeps a huge finite value.)
    shifted = jnp.where(shifted <= -jnp.finfo(shift_dtype).max, -jnp.inf, shifted)
    # (x - m) - log(sum): subtracting log(sum) from the small shifted value keeps digits that
    # x - (m + log(sum)) loses at large |x|.
    return (shifted - jnp.log(total)).astype(x.dtype)


def logsumexp(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """log(sum(exp(x))) over ``axes`` (kept): -inf for an empty or fully masked slice, +inf with
    any +inf entry (``exp(+inf - finfo.max) = inf``), NaN with any NaN."""
    compute = compute_dtype(x.dtype)
    shift = _shift(x, axes, axis_name, x.dtype)
    total = global_sum(jnp.exp(x.astype(compute) - shift), axes, axis_name)
    return (shift + jnp.log(total)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Tangent maps. The Jacobian of softmax, diag(y) - y y^T, is symmetric: one map serves both
# directions. log_softmax's map and its transpose differ; both treat -inf outputs (masked
# entries) as constants, so nothing flows into or out of them.


def tangent(
    y: jax.Array,
    t: jax.Array,
    axes: Axes,
    axis_name: Any,
    log: bool,
    transposed: bool,
    masked: bool,
) -> jax.Array:
    """The Jacobian of softmax / log_softmax at output ``y`` applied to ``t`` (or its transpose).

    ``masked`` (a ``where=`` mask was given): zero-probability entries neither receive nor pass
    on a tangent or cotangent, even an inf or NaN one, as jax.nn does.
    """
    compute = compute_dtype(y.dtype)
    out, vec = y.astype(compute), t.astype(compute)
    if not log:
        if masked:
            vec = jnp.where(out == 0, 0, vec)
        result = out * (vec - global_sum(vec * out, axes, axis_name))
    elif transposed:
        vec = jnp.where(out == -jnp.inf, 0, vec)
        result = vec - jnp.exp(out) * global_sum(vec, axes, axis_name)
    else:
        result = vec - global_sum(jnp.exp(out) * vec, axes, axis_name)
        result = jnp.where(out == -jnp.inf, 0, result)
    return result.astype(y.dtype)
