"""What softmax, log_softmax and logsumexp compute, and their derivatives, as plain JAX.

This module is the one place for the semantics (the -inf, +inf, NaN and fully masked rules). The
primitives in ``_primitives.py`` lower to these functions on every platform where no hand-written
kernel applies, and their differentiation rules are built from the tangent maps here.

The forward formulas contain no ``select`` on the row maximum or the row sum: XLA's GPU softmax
fusion (and the TPU fusions) only fuse a reduce -> broadcast -> elementwise chain whose row values
pass through unary ops or ops with a constant operand, so one select there splits the computation
into several kernels. The rules are obtained from the reductions' initial values and one
elementwise select on the input instead:

* The row maximum is reduced from ``finfo.min``: a fully masked slice gets the shift
  ``finfo.min`` and ``-inf - finfo.min`` stays -inf (never ``-inf - -inf = NaN``).
* ``where(x == +inf, 0, x - shift)``: in a slice holding +inf the shift is +inf, so the +inf
  entries contribute ``exp(0) = 1`` each and share the mass (1/k each), and every finite entry
  gets ``x - inf = -inf``, probability 0.
* The sum is reduced from ``finfo.tiny``: a fully masked slice sums to a positive number and gives
  0 / tiny = 0 (log_softmax: -inf - log(tiny) = -inf), never 0 / 0. Every other slice sums to at
  least 1, which absorbs tiny.
* NaN propagates through max, sum and exp, so a NaN slice is NaN and only that slice.

Everything is computed in float32 for sub-32-bit inputs and rounded once.
"""

from __future__ import annotations

import math
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


def _single_entry(x: jax.Array, axes: Axes) -> bool:
    """Whether each local slice has one entry: XLA then turns the reduction into a copy and drops
    its initial value, so the floors it carries (finfo.min, tiny) are applied explicitly. Only
    there: as a row-level op the floor would cost a kernel of its own on TPU."""
    return math.prod(x.shape[a] for a in axes) == 1


def shifted_input(x: jax.Array, axes: Axes, axis_name: Any) -> tuple[jax.Array, jax.Array]:
    """(shift, x - shift): the slice maximum (kept axes) and ``x`` minus it, in the compute
    dtype, with the rules above.

    The maximum is exact in any dtype, so it is taken in the input dtype (on TPU an upcast before
    the reduction costs a kernel of its own).
    """
    # A constant under differentiation (the reduction has no derivative rule; none is needed).
    lowest = jnp.finfo(x.dtype).min
    shift = _keep(lax.reduce(lax.stop_gradient(x), lowest, lax.max, axes), axes)
    if _single_entry(x, axes):
        shift = jnp.maximum(shift, lowest)  # see _single_entry
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    shift = shift.astype(compute_dtype(x.dtype))
    return shift, subtract_shift(x, shift)


def subtract_shift(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``x - shift`` in the compute dtype, 0 at +inf entries (the rules above)."""
    wide = x.astype(compute_dtype(x.dtype))
    return jnp.where(wide == jnp.inf, 0, wide - shift)


def exp_sum(shifted: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """``sum(exp(shifted))`` over ``axes`` (kept), reduced from ``finfo.tiny``: positive even for
    a fully masked slice, exact otherwise (every other slice sums to at least 1)."""
    tiny = jnp.finfo(shifted.dtype).tiny
    total = _keep(lax.reduce(jnp.exp(shifted), tiny, lax.add, axes), axes)
    if _single_entry(shifted, axes):
        total = jnp.maximum(total, tiny)  # see _single_entry
    return total if axis_name is None else lax.psum(total, axis_name)


@jax.custom_jvp
def log_of_sum(total: jax.Array) -> jax.Array:
    """``log(total)`` for a slice's sum of exponentials: at least 1, or the floor of a fully
    masked slice, where the total and its tangent are 0 but differentiating ``t / total`` again
    would meet ``1 / tiny**2 = inf`` and give ``0 * inf = NaN`` at second and higher order."""
    return jnp.log(total)


@log_of_sum.defjvp
def _log_of_sum_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]):
    (total,), (tangent,) = primals, tangents
    return jnp.log(total), tangent / jnp.where(total < 1, 1, total)


def masked(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``x`` with the entries ``where`` excludes set to -inf."""
    return x if where is None else jnp.where(where, x, jnp.array(-jnp.inf, x.dtype))


def normalize(x: jax.Array, axes: Axes, axis_name: Any, log: bool) -> jax.Array:
    """softmax (``log=False``) or log_softmax of ``x`` over ``axes``; masked entries are -inf."""
    _, shifted = shifted_input(x, axes, axis_name)
    total = exp_sum(shifted, axes, axis_name)
    if log:
        # (x - m) - log(sum): subtracting log(sum) from the small shifted value keeps digits that
        # x - (m + log(sum)) loses at large |x|.
        return (shifted - jnp.log(total)).astype(x.dtype)
    return (jnp.exp(shifted) / total).astype(x.dtype)


def logsumexp(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """log(sum(exp(x))) over ``axes`` (kept): -inf for an empty or fully masked slice, +inf with
    any +inf entry, NaN with any NaN."""
    shift, shifted = shifted_input(x, axes, axis_name)
    total = global_sum(jnp.exp(shifted), axes, axis_name)
    return (shift + jnp.log(total)).astype(x.dtype)


def plain_first(exact: Any, finish: Any, x: jax.Array, axes: Axes, axis_name: Any) -> Any:
    """On CPU: ``finish(shift, x - shift, sum(exp(x - shift)))`` by the plain formulas when every
    slice maximum is finite, else ``exact(x)``.

    XLA's CPU backend (YNNPACK) fuses ``max -> exp(x - max) -> sum`` into one pass only in that
    plain form; the select of the +inf rule, or a clamp, makes it materialise a copy of ``x``
    (2.5x the time of ``log(sum(exp(x - max)))`` at [1024, 32000]). With every maximum finite the
    plain formulas give the same values, so only a batch with a +-inf or NaN maximum pays for the
    exact ones. The shift (kept axes), ``x - shift`` and the sum are in the compute dtype. Both
    branches live inside the ``lax.cond`` (a plain result computed outside would carry a +inf
    slice's NaN tangents into reverse mode even when the exact branch is taken).
    """

    def plain(x: jax.Array, shift: jax.Array) -> Any:
        shifted = x.astype(shift.dtype) - shift
        return finish(shift, shifted, global_sum(jnp.exp(shifted), axes, axis_name))

    # The maximum in the input dtype (exact): a bf16 upcast first is a float32 copy on CPU. From
    # -inf, not finfo.min: a fully masked slice must take the exact branch.
    shift = _keep(
        lax.reduce(lax.stop_gradient(x), jnp.array(-jnp.inf, x.dtype), lax.max, axes), axes
    )
    if axis_name is not None:
        shift = lax.pmax(shift, axis_name)
    shift = shift.astype(compute_dtype(x.dtype))
    return lax.cond(jnp.all(jnp.isfinite(shift)), plain, lambda x, _: exact(x), x, shift)


def normalize_cpu(x: jax.Array, axes: Axes, axis_name: Any, log: bool) -> jax.Array:
    """:func:`normalize` by :func:`plain_first`."""

    def finish(shift: jax.Array, shifted: jax.Array, total: jax.Array) -> jax.Array:
        if log:
            return (shifted - jnp.log(total)).astype(x.dtype)
        return (jnp.exp(shifted) / total).astype(x.dtype)

    return plain_first(lambda x: normalize(x, axes, axis_name, log), finish, x, axes, axis_name)


def logsumexp_cpu(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """:func:`logsumexp` by :func:`plain_first`."""

    def finish(shift: jax.Array, shifted: jax.Array, total: jax.Array) -> jax.Array:
        return (shift + jnp.log(total)).astype(x.dtype)

    return plain_first(lambda x: logsumexp(x, axes, axis_name), finish, x, axes, axis_name)


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


def scaled_logsumexp(
    x: jax.Array, scale: jax.Array, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    """(log|sum(scale * exp(x))|, sign of the sum) over ``axes`` (kept), as
    ``jax.scipy.special.logsumexp(x, b=scale, return_sign=True)``: entries with ``scale == 0``
    are left out; an empty sum gives -inf with sign 0. Plain JAX, differentiated by JAX."""
    x = jnp.where(scale == 0, jnp.array(-jnp.inf, x.dtype), x)
    shift, shifted = shifted_input(x, axes, axis_name)
    total = global_sum(scale.astype(shifted.dtype) * jnp.exp(shifted), axes, axis_name)
    magnitude = jnp.abs(total)
    # The double where keeps the gradient of an empty slice at 0 (never 0 * inf).
    safe = jnp.where(magnitude == 0, 1, magnitude)
    value = jnp.where(magnitude == 0, -jnp.inf, shift + jnp.log(safe))
    return value.astype(x.dtype), jnp.sign(total).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# cross_entropy with integer labels over the last axis (the CPU kernels' operands; the
# cross-entropy module builds its general case from the same rules)


def label_statistics(x: jax.Array) -> jax.Array:
    """``[..., 3]``: each row's ``(shift, log_normalizer, shifted_sum)`` in the compute dtype,
    the rules above (shift = the row maximum, ``log_normalizer = log(sum(exp(x - shift)))``,
    ``shifted_sum = sum(x - shift)`` with +inf entries counting 0: label smoothing's term)."""
    axes = (x.ndim - 1,)
    shift, shifted = shifted_input(x, axes, None)
    log_normalizer = log_of_sum(exp_sum(shifted, axes, None))
    return jnp.concatenate((shift, log_normalizer, global_sum(shifted, axes, None)), axis=-1)


def label_gradient(
    x: jax.Array,
    stats: jax.Array,
    scale: jax.Array,
    code: jax.Array,
    label_mass: float = 1.0,
    uniform: float = 0.0,
) -> jax.Array:
    """``scale * (softmax(x) - label_mass * onehot(code) - uniform)`` per row from the row
    statistics (``stats[..., :2]``: shift, log_normalizer), in the compute dtype: 0 at -inf
    logits (masked classes are constants); ``code`` -1 marks an ignored row (all 0, even at NaN
    logits), -2 a label out of range (all NaN)."""
    compute = compute_dtype(x.dtype)
    shift, log_normalizer = stats[..., :1], stats[..., 1:2]
    probs = jnp.exp(subtract_shift(x, shift) - log_normalizer)
    code = code[..., None]
    row_scale = scale.astype(compute)[..., None]
    is_label = lax.broadcasted_iota(code.dtype, x.shape, x.ndim - 1) == code
    grad = row_scale * (jnp.where(is_label, probs - label_mass, probs) - uniform)
    grad = jnp.where(x == -jnp.inf, 0, grad)
    grad = jnp.where(code == -1, 0, grad)
    return jnp.where(code == -2, jnp.nan, grad)
