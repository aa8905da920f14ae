"""Stable softmax, log_softmax and logsumexp: the public functions.

Each public function validates its arguments once, normalises the axes to a sorted tuple of
non-negative ints (so equal calls share one compilation) and calls a function jitted here, which
masks the input and binds a primitive of ``_primitives.py``. What is computed (the -inf, +inf,
NaN and fully masked rules) is in ``_formula.py``; how it is differentiated and which
implementation runs on each platform, in ``_primitives.py``.

Numerics, shared by all three:

* bf16 / f16 (and other sub-32-bit floats) are computed in float32 and rounded once at the end.
* Masked entries (``where`` False) are -inf; -inf entries behave as masked ones.
* A slice with no unmasked finite-or-+inf entry: softmax 0, log_softmax -inf, logsumexp -inf,
  gradient 0 (never NaN).
* A +inf entry wins its slice (the limit as that logit grows): the +inf entries share the mass
  equally, everything else gets 0; logsumexp is +inf.
* NaN in a slice makes that slice NaN; other slices are untouched.

With ``axis_name`` (inside ``jax.shard_map``) the reductions run across that mesh axis too,
forward and backward: one code path, local or sharded.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _formula, _kernel, _primitives
from ._reductions import Axes, axis_size
from ._validation import as_mask, check_input, normalize_axes


# ``kernel_mode`` (JSOFTMAX_CPU_KERNEL) is read when tracing: as a static argument it gives each
# mode its own compilation.
@partial(jax.jit, static_argnames=("axes", "dtype", "axis_name", "kernel_mode", "log"))
def _normalize_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    axis_name: Any = None,
    kernel_mode: str = "auto",
    log: bool = False,
) -> jax.Array:
    x = x.astype(dtype)
    del kernel_mode  # read by _kernel.eligible while tracing
    return _primitives.normalize(x, where, axes, axis_name, log=log)


def _softmax_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    axis_name: Any = None,
    kernel_mode: str = "auto",
) -> jax.Array:
    return _normalize_jit(x, where, axes, dtype, axis_name, kernel_mode, log=False)


def _log_softmax_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    axis_name: Any = None,
    kernel_mode: str = "auto",
) -> jax.Array:
    return _normalize_jit(x, where, axes, dtype, axis_name, kernel_mode, log=True)


@partial(jax.jit, static_argnames=("axes", "dtype", "keepdims", "axis_name", "return_sign"))
def _scaled_logsumexp_jit(
    x: jax.Array,
    b: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    keepdims: bool,
    axis_name: Any,
    return_sign: bool,
) -> Any:
    x = _formula.masked(x.astype(dtype), where)
    value, sign = _formula.scaled_logsumexp(x, jnp.broadcast_to(b, x.shape), axes, axis_name)
    if not keepdims:
        value, sign = jnp.squeeze(value, axis=axes), jnp.squeeze(sign, axis=axes)
    if return_sign:
        return value, sign
    # A negative sum has no real logarithm (jax.scipy's convention).
    return jnp.where(sign < 0, jnp.nan, value)


@partial(jax.jit, static_argnames=("axes", "dtype", "keepdims", "axis_name"))
def _logsumexp_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    keepdims: bool,
    axis_name: Any = None,
) -> jax.Array:
    x = x.astype(dtype)
    out = _primitives.logsumexp(x, where, axes, axis_name)
    return out if keepdims else jnp.squeeze(out, axis=axes)


def softmax(
    x: Any, axis: Any = -1, *, where: Any = None, dtype: Any = None, axis_name: Any = None
) -> jax.Array:
    r"""Softmax along ``axis``, stable for any input and safe on fully masked slices.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_{j \in S} \exp(x_j - m)},
        \quad m = \max_{j \in S} x_j

    where :math:`S` is the set of unmasked entries of the slice.

    Args:
      x: input array (a jax.Array, numpy array or scalar). Bool and integer inputs promote to the
        default floating dtype.
      axis: int or tuple of ints (negative allowed) over which to normalise; None means all axes.
      where: optional boolean array broadcastable to ``x``; False entries are excluded and get
        probability 0.
      dtype: optional floating dtype; ``x`` is cast to it first (torch's ``dtype=``).
      axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of axes) over which ``axis``
        is split in equal shards: the result is the global one, and the backward pass reduces
        across ``axis_name`` too.

    Returns:
      An array of ``x``'s shape and (possibly cast) dtype.

    Note:
      Masked and -inf entries get probability 0 and gradient 0 (with ``where``, even for an inf or
      NaN cotangent there; without it, for any finite one). A slice with nothing unmasked
      gives 0 (jax.nn and torch give NaN). A +inf entry takes the limit: the +inf entries of a
      slice share probability 1 equally. NaN in a slice makes that slice NaN, and only that slice.
      bf16/f16 are computed in float32 and rounded once. Every JAX transformation applies
      (``grad``, ``jvp``, ``jacfwd``, ``hessian``, ``vmap``, ...): the tangent map
      ``y * (t - sum(t * y))`` is hand-written and is its own transpose, so reverse mode saves
      only the output and runs the same rule (the CPU backward kernel where it applies).

    Example:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
      >>> import numpy as np
      >>> print(np.asarray(jsoftmax.softmax(x)).round(4))
      [[0.09   0.2447 0.6652]
       [0.     0.     0.    ]]
      >>> print(np.asarray(jsoftmax.softmax(x[0], where=jnp.array([True, False, True]))).round(4))
      [0.1192 0.     0.8808]

      Inside ``jax.shard_map``, ``axis_name`` normalises across the shards of the class axis:

      >>> import jax
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("vocab",), axis_types=(AxisType.Auto,))
      >>> sharded = jax.shard_map(
      ...     lambda shard: jsoftmax.softmax(shard, axis_name="vocab"),
      ...     mesh=mesh, in_specs=P(None, "vocab"), out_specs=P(None, "vocab"))
      >>> print(np.asarray(sharded(jnp.array([[0.0, 1.0, 2.0, 3.0]]))).round(4))
      [[0.0321 0.0871 0.2369 0.6439]]
    """
    array, out_dtype = check_input(x, dtype, "softmax")
    axes = normalize_axes(axis, array.ndim, "softmax")
    mask = as_mask(where, array.shape, "softmax")
    if axis_name is not None:
        axis_size(axis_name, "softmax")
    return _softmax_jit(array, mask, axes, out_dtype, axis_name, _kernel.mode())


def log_softmax(
    x: Any, axis: Any = -1, *, where: Any = None, dtype: Any = None, axis_name: Any = None
) -> jax.Array:
    r"""Log-softmax along ``axis``, computed as ``(x - m) - log(sum(exp(x - m)))``.

    .. math::
        \mathrm{log\_softmax}(x)_i = (x_i - m) - \log \sum_{j \in S} \exp(x_j - m),
        \quad m = \max_{j \in S} x_j

    Args:
      x: input array (a jax.Array, numpy array or scalar). Bool and integer inputs promote to the
        default floating dtype.
      axis: int or tuple of ints (negative allowed) over which to normalise; None means all axes.
      where: optional boolean array broadcastable to ``x``; False entries are excluded and get
        log-probability -inf.
      dtype: optional floating dtype; ``x`` is cast to it first (torch's ``dtype=``).
      axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of axes) over which ``axis``
        is split in equal shards: the result is the global one, and the backward pass reduces
        across ``axis_name`` too.

    Returns:
      An array of ``x``'s shape and (possibly cast) dtype.

    Note:
      Masked and -inf entries give -inf with gradient 0; a slice with nothing unmasked gives -inf
      everywhere and gradient 0 (jax.nn and torch give NaN). +inf entries share the slice:
      ``-log(k)`` for k of them, -inf elsewhere. NaN in a slice makes that slice NaN. bf16/f16 are
      computed in float32 and rounded once. Every JAX transformation applies: the tangent map
      ``t - sum(exp(y) * t)`` and its transpose ``g - exp(y) * sum(g)`` are hand-written, and
      reverse mode saves only the output (see :func:`softmax`).

    Example:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> import numpy as np
      >>> print(np.asarray(jsoftmax.log_softmax(jnp.array([1.0, 2.0, 3.0]))).round(4))
      [-2.4076 -1.4076 -0.4076]
      >>> print(jsoftmax.log_softmax(jnp.array([1e30, 0.0])))
      [  0. -1e+30]
    """
    array, out_dtype = check_input(x, dtype, "log_softmax")
    axes = normalize_axes(axis, array.ndim, "log_softmax")
    mask = as_mask(where, array.shape, "log_softmax")
    if axis_name is not None:
        axis_size(axis_name, "log_softmax")
    return _log_softmax_jit(array, mask, axes, out_dtype, axis_name, _kernel.mode())


def logsumexp(
    x: Any,
    axis: Any = -1,
    *,
    where: Any = None,
    keepdims: bool = False,
    dtype: Any = None,
    axis_name: Any = None,
    b: Any = None,
    return_sign: bool = False,
) -> Any:
    r"""Log of the sum of exponentials along ``axis``, stable for any input.

    .. math::
        \mathrm{logsumexp}(x) = m + \log \sum_{j \in S} \exp(x_j - m),
        \quad m = \max_{j \in S} x_j

    Args:
      x: input array (a jax.Array, numpy array or scalar). Bool and integer inputs promote to the
        default floating dtype.
      axis: int or tuple of ints (negative allowed) to reduce; None means all axes.
      where: optional boolean array broadcastable to ``x``; False entries are excluded.
      keepdims: keep the reduced axes with size 1.
      dtype: optional floating dtype; ``x`` is cast to it first.
      axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of axes) over which ``axis``
        is split in equal shards: the result is the global one, and the backward pass reduces
        across ``axis_name`` too.
      b: optional scale factors broadcastable to ``x``, as ``jax.scipy.special.logsumexp``'s:
        computes ``log(sum(b * exp(x)))``; entries with ``b == 0`` are left out. Without
        ``return_sign`` a negative sum gives NaN.
      return_sign: also return the sign of the sum (-1, 0 or 1), as jax.scipy does.

    Returns:
      ``x`` reduced over ``axis``, in ``x``'s (possibly cast) dtype; with ``return_sign``, the
      pair ``(log|sum|, sign)``.

    Note:
      An empty or fully masked slice gives -inf with gradient 0 (jax.nn gives a NaN gradient).
      Any +inf entry gives +inf. NaN in a slice gives NaN for that slice. The backward pass is a
      hand-written rule (tangent ``sum(softmax(x) * t)``, reverse ``softmax(x) * g``) that saves
      one array of ``x``'s size, the probabilities. With ``b`` the formula is plain JAX,
      differentiated by JAX. Unlike ``jax.scipy``, ``axis`` defaults to the last axis.

    Example:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> import numpy as np
      >>> lse = jsoftmax.logsumexp(jnp.array([[0.0, 0.0], [1000.0, 1000.0]]))
      >>> print(np.asarray(lse, np.float64).round(3).tolist())
      [0.693, 1000.693]
    """
    array, out_dtype = check_input(x, dtype, "logsumexp")
    axes = normalize_axes(axis, array.ndim, "logsumexp")
    mask = as_mask(where, array.shape, "logsumexp")
    if not isinstance(keepdims, bool):
        raise TypeError(f"logsumexp: keepdims expected a bool, got {keepdims!r}")
    if not isinstance(return_sign, bool):
        raise TypeError(f"logsumexp: return_sign expected a bool, got {return_sign!r}")
    if axis_name is not None:
        axis_size(axis_name, "logsumexp")
    if b is None and not return_sign:
        return _logsumexp_jit(array, mask, axes, out_dtype, keepdims, axis_name)
    scale = jnp.ones((), out_dtype) if b is None else check_input(b, None, "logsumexp", "b")[0]
    try:
        broadcast = np.broadcast_shapes(scale.shape, array.shape)
    except ValueError:
        broadcast = None
    if broadcast != array.shape:
        raise ValueError(
            f"logsumexp: b expected a shape that broadcasts to x's shape {array.shape}, "
            f"got {scale.shape}"
        )
    return _scaled_logsumexp_jit(
        array, scale, mask, axes, out_dtype, keepdims, axis_name, return_sign
    )
