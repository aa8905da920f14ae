"""Softmax, log_softmax and logsumexp over an axis split across devices (``axis_name=``).

Inside ``jax.shard_map`` each device holds one shard of the normalised axis. These versions
compute the global result on every shard: the slice maximum is a ``lax.pmax`` and the sum of
exponentials a ``lax.psum`` over ``axis_name``, so only per-slice scalars cross devices, never the
array. Each is a ``jax.custom_vjp`` whose backward pass reduces across ``axis_name`` too (the
``sum(g * y)`` of softmax, the ``sum(g)`` of log_softmax); the numerics are those of the
single-device functions (see ``_softmax.py``): float32 compute for bf16/f16, fully masked slices
give 0 / -inf with gradient 0, +inf entries win their slice, NaN stays in its slice.

The reductions here (:func:`global_max`, :func:`global_sum`, :func:`shift_logits`) are shared with
the cross-entropy, which reduces over a single device's axis when ``axis_name`` is None.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._softmax import _compute_dtype, _masked_input

Axes = tuple[int, ...]


def axis_size(axis_name: Any, fname: str) -> int:
    """Number of devices along ``axis_name``; a clear error when no shard_map binds it."""
    try:
        if hasattr(lax, "axis_size"):
            return int(lax.axis_size(axis_name))
        return int(lax.psum(1, axis_name))
    except NameError as err:
        raise ValueError(
            f"{fname}: axis_name expected a mesh axis bound by an enclosing jax.shard_map, "
            f"got {axis_name!r}"
        ) from err


def global_max(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """Maximum over ``axes`` and, when given, across the devices of ``axis_name`` (kept dims)."""
    # pmax has no differentiation rule; the maximum is a constant shift anyway.
    local_max = jnp.max(lax.stop_gradient(x), axis=axes, keepdims=True, initial=-jnp.inf)
    return local_max if axis_name is None else lax.pmax(local_max, axis_name)


def global_sum(x: Any, axes: Axes, axis_name: Any) -> Any:
    """Sum over ``axes`` and, when given, across ``axis_name`` (kept dims).

    ``x`` may be a tuple of arrays: the sums then cross devices in one all-reduce.
    """
    local_sum = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=axes, keepdims=True), x)
    return local_sum if axis_name is None else lax.psum(local_sum, axis_name)


def shift_logits(
    logits: jax.Array, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row_max, shift, shifted)`` with ``shifted = logits - shift`` and the +inf limit taken.

    The shift is the slice maximum when finite and 0 otherwise, so a fully masked slice stays
    -inf (not ``-inf - -inf = NaN``) and a NaN slice stays NaN. In a slice holding +inf, the +inf
    entries become 0 and all others -inf: the limit as those logits grow.
    """
    row_max = global_max(logits, axes, axis_name)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0)
    shifted = jnp.where(
        row_max == jnp.inf, jnp.where(logits == jnp.inf, 0.0, -jnp.inf), logits - shift
    ).astype(logits.dtype)
    return row_max, shift, shifted


def _log_safe_sum(sum_exp: jax.Array) -> jax.Array:
    """log of the sum of exponentials, with 0 (fully masked slices only) replaced by 1."""
    return jnp.log(jnp.where(sum_exp == 0, 1, sum_exp))


# --------------------------------------------------------------------------------------------
# softmax


def _softmax_fwd(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    _, _, shifted = shift_logits(_masked_input(x, where), axes, axis_name)
    exp_shifted = jnp.exp(shifted)
    sum_exp = global_sum(exp_shifted, axes, axis_name)
    probs = (exp_shifted / jnp.where(sum_exp == 0, 1, sum_exp)).astype(x.dtype)
    return probs, probs


def _softmax_bwd(
    axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    compute = _compute_dtype(probs.dtype)
    y = probs.astype(compute)
    # Probability-0 (masked) positions neither receive nor pass on gradient, even inf or NaN.
    g = jnp.where(probs == 0, 0, cotangent.astype(compute))
    grad = y * (g - global_sum(g * y, axes, axis_name))
    return grad.astype(probs.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _softmax_fwd(x, where, axes, axis_name)[0]


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


# --------------------------------------------------------------------------------------------
# log_softmax


def _log_softmax_fwd(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    _, _, shifted = shift_logits(_masked_input(x, where), axes, axis_name)
    sum_exp = global_sum(jnp.exp(shifted), axes, axis_name)
    log_probs = (shifted - _log_safe_sum(sum_exp)).astype(x.dtype)
    return log_probs, log_probs


def _log_softmax_bwd(
    axes: Axes, axis_name: Any, log_probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    compute = _compute_dtype(log_probs.dtype)
    y = log_probs.astype(compute)
    # Masked (-inf) outputs are constants: their cotangent must not reach the sum.
    g = jnp.where(log_probs == -jnp.inf, 0, cotangent.astype(compute))
    grad = g - jnp.exp(y) * global_sum(g, axes, axis_name)
    return grad.astype(log_probs.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _log_softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _log_softmax_fwd(x, where, axes, axis_name)[0]


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


# --------------------------------------------------------------------------------------------
# logsumexp (keeps the reduced axes; the entry point squeezes them)


def _logsumexp_value(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    row_max, shift, shifted = shift_logits(_masked_input(x, where), axes, axis_name)
    exp_shifted = jnp.exp(shifted)
    sum_exp = global_sum(exp_shifted, axes, axis_name)
    log_normalizer = jnp.where(row_max == jnp.inf, jnp.inf, shift + jnp.log(sum_exp))
    probs = (exp_shifted / jnp.where(sum_exp == 0, 1, sum_exp)).astype(x.dtype)
    return log_normalizer.astype(x.dtype), probs


def _logsumexp_bwd(
    axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    # The cotangent is the same on every shard: each shard's gradient is its own probabilities.
    compute = _compute_dtype(probs.dtype)
    grad = probs.astype(compute) * cotangent.astype(compute)
    return grad.astype(probs.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logsumexp(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _logsumexp_value(x, where, axes, axis_name)[0]


_logsumexp.defvjp(_logsumexp_value, _logsumexp_bwd)


# --------------------------------------------------------------------------------------------
# entry points, called by the public functions after validation


def _broadcast_mask(where: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    return None if where is None else jnp.broadcast_to(where, shape)


@partial(jax.jit, static_argnames=("axes", "dtype", "axis_name"))
def _softmax_jit(
    x: jax.Array, where: jax.Array | None, axes: Axes, dtype: Any, axis_name: Any
) -> jax.Array:
    x = x.astype(dtype)
    return _softmax(x, _broadcast_mask(where, x.shape), axes, axis_name)


@partial(jax.jit, static_argnames=("axes", "dtype", "axis_name"))
def _log_softmax_jit(
    x: jax.Array, where: jax.Array | None, axes: Axes, dtype: Any, axis_name: Any
) -> jax.Array:
    x = x.astype(dtype)
    return _log_softmax(x, _broadcast_mask(where, x.shape), axes, axis_name)


@partial(jax.jit, static_argnames=("axes", "dtype", "keepdims", "axis_name"))
def _logsumexp_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    keepdims: bool,
    axis_name: Any,
) -> jax.Array:
    x = x.astype(dtype)
    out = _logsumexp(x, _broadcast_mask(where, x.shape), axes, axis_name)
    return out if keepdims else jnp.squeeze(out, axis=axes)


def softmax(
    x: jax.Array, where: jax.Array | None, axes: Axes, dtype: Any, axis_name: Any
) -> jax.Array:
    """Softmax of the shard ``x`` normalised over ``axes`` and across ``axis_name``.

    Called by :func:`jsoftmax.softmax` when ``axis_name`` is given, after validation.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> import jsoftmax
      >>> mesh = jax.make_mesh((1,), ("vocab",), axis_types=(AxisType.Auto,))
      >>> shard_softmax = jax.shard_map(
      ...     lambda x: jsoftmax.softmax(x, axis_name="vocab"),
      ...     mesh=mesh, in_specs=P(None, "vocab"), out_specs=P(None, "vocab"))
      >>> print(np.asarray(shard_softmax(jnp.array([[0.0, 1.0, 2.0, 3.0]]))).round(4))
      [[0.0321 0.0871 0.2369 0.6439]]
    """
    axis_size(axis_name, "softmax")
    return _softmax_jit(x, where, axes, dtype, axis_name)


def log_softmax(
    x: jax.Array, where: jax.Array | None, axes: Axes, dtype: Any, axis_name: Any
) -> jax.Array:
    """Log-softmax of the shard ``x`` over ``axes`` and across ``axis_name`` (see softmax).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> import jsoftmax
      >>> mesh = jax.make_mesh((1,), ("vocab",), axis_types=(AxisType.Auto,))
      >>> shard_log_softmax = jax.shard_map(
      ...     lambda x: jsoftmax.log_softmax(x, axis_name="vocab"),
      ...     mesh=mesh, in_specs=P("vocab"), out_specs=P("vocab"))
      >>> print(np.asarray(shard_log_softmax(jnp.array([1.0, 2.0, 3.0]))).round(4))
      [-2.4076 -1.4076 -0.4076]
    """
    axis_size(axis_name, "log_softmax")
    return _log_softmax_jit(x, where, axes, dtype, axis_name)


def logsumexp(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    keepdims: bool,
    axis_name: Any,
) -> jax.Array:
    """Logsumexp of the shard ``x`` over ``axes`` and across ``axis_name``, on every shard.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> import jsoftmax
      >>> mesh = jax.make_mesh((1,), ("vocab",), axis_types=(AxisType.Auto,))
      >>> shard_logsumexp = jax.shard_map(
      ...     lambda x: jsoftmax.logsumexp(x, axis_name="vocab"),
      ...     mesh=mesh, in_specs=P("vocab"), out_specs=P())
      >>> print(np.asarray(shard_logsumexp(jnp.array([1000.0, 1000.0]))).round(4))
      1000.6932
    """
    axis_size(axis_name, "logsumexp")
    return _logsumexp_jit(x, where, axes, dtype, keepdims, axis_name)
