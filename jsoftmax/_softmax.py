"""Stable softmax, log_softmax and logsumexp with hand-written VJPs.

Each public function validates its arguments once, normalises the axes to a sorted tuple of
non-negative ints (so equal calls share one compilation) and calls a function jitted here. The
differentiable core of each is a ``jax.custom_vjp`` that saves exactly one array for the backward
pass: the output (softmax, log_softmax) or the probabilities (logsumexp, whose output is reduced).

Numerics, shared by all three:

* bf16 / f16 (and other sub-32-bit floats) are computed in float32 and rounded once at the end.
* Masked entries (``where`` False) are -inf; -inf entries behave as masked ones.
* A slice with no unmasked finite-or-+inf entry sums to zero: softmax 0, log_softmax -inf,
  logsumexp -inf, gradient 0 (never NaN).
* A +inf entry wins its slice (the limit as that logit grows): the +inf entries share the mass
  equally, everything else gets 0; logsumexp is +inf.
* NaN in a slice makes that slice NaN; other slices are untouched.

With ``axis_name`` (inside ``jax.shard_map``) the same kernels reduce across that mesh axis too,
forward and backward (``_reductions.py``): one code path, local or sharded.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from . import _kernel
from ._reductions import Axes, axis_size, compute_dtype, global_max, global_sum, masked_input
from ._validation import as_mask, check_input, normalize_axes


def _shift_and_sum(
    logits: jax.Array, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The pieces every function needs: (row_max, shifted, sum_exp, safe_sum).

    ``shifted = logits - shift`` with a shift that is constant under differentiation. The shift is
    the slice maximum when finite and 0 otherwise, so a fully masked slice stays -inf (not
    ``-inf - -inf = NaN``) and a NaN slice stays NaN. ``safe_sum`` is ``sum_exp`` with 0 (fully
    masked slices only: otherwise the maximum contributes exp(0) = 1) replaced by 1. With
    ``axis_name`` the maximum and the sum run across that mesh axis too.
    """
    row_max = global_max(logits, axes, axis_name)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0)
    shifted = logits - shift
    # Slices holding +inf take the limit: +inf entries -> 0, all others -> -inf.
    shifted = jnp.where(
        row_max == jnp.inf, jnp.where(logits == jnp.inf, 0.0, -jnp.inf), shifted
    ).astype(logits.dtype)
    sum_exp = global_sum(jnp.exp(shifted), axes, axis_name)
    safe_sum = jnp.where(sum_exp == 0, 1, sum_exp)
    return row_max, shifted, sum_exp, safe_sum


# --------------------------------------------------------------------------------------------
# softmax


def _kernel_or_xla(
    name: str, kernel_ok: bool, axes: Axes, xla: Any, *operands: jax.Array
) -> jax.Array:
    """The CPU kernel ``name`` where this is lowered for CPU and ``kernel_ok``, else ``xla``."""
    if not kernel_ok:
        return xla(*operands)
    kernel = _differentiable_backward if name.endswith("_bwd") else _differentiable_forward
    out: jax.Array = jax.lax.platform_dependent(
        *operands, cpu=partial(kernel, name, axes), default=xla
    )
    return out


# The kernels wrapped so that higher derivatives (grad of grad, jacrev(jacrev)) work: a forward
# kernel's VJP is the function's own backward rule; a backward kernel's VJP is that of the XLA
# formula it computes.


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable_forward(name: str, axes: Axes, x: jax.Array) -> jax.Array:
    return _kernel.call(name, axes, x)


def _differentiable_forward_fwd(name: str, axes: Axes, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = _kernel.call(name, axes, x)
    return out, out


def _differentiable_forward_bwd(
    name: str, axes: Axes, out: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array]:
    backward = _softmax_bwd if name == "softmax_fwd" else _log_softmax_bwd
    return (backward(axes, None, out, cotangent)[0],)


_differentiable_forward.defvjp(_differentiable_forward_fwd, _differentiable_forward_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable_backward(name: str, axes: Axes, y: jax.Array, g: jax.Array) -> jax.Array:
    return _kernel.call(name, axes, y, g)


def _differentiable_backward_fwd(
    name: str, axes: Axes, y: jax.Array, g: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _kernel.call(name, axes, y, g), (y, g)


def _differentiable_backward_bwd(
    name: str, axes: Axes, res: tuple[jax.Array, jax.Array], cotangent: jax.Array
) -> tuple[jax.Array, jax.Array]:
    formula = _softmax_grad if name == "softmax_bwd" else _log_softmax_grad
    _, vjp = jax.vjp(partial(formula, axes, None), *res)
    grads: tuple[jax.Array, jax.Array] = vjp(cotangent)
    return grads


_differentiable_backward.defvjp(_differentiable_backward_fwd, _differentiable_backward_bwd)


def _forward(
    name: str,
    xla_formula: Any,
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    axis_name: Any,
) -> tuple[jax.Array, jax.Array]:
    """A custom VJP's forward rule: the output, saved as the one residual."""
    kernel_ok = where is None and _kernel.eligible(x, axes, axis_name)
    xla = partial(xla_formula, where=where, axes=axes, axis_name=axis_name)
    out = _kernel_or_xla(f"{name}_fwd", kernel_ok, axes, xla, x)
    return out, out


def _backward(
    name: str, xla_formula: Any, axes: Axes, axis_name: Any, out: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    """A custom VJP's backward rule from the saved output (no gradient for ``where``)."""
    cotangent = cotangent.astype(out.dtype)
    kernel_ok = _kernel.eligible(out, axes, axis_name)
    xla = partial(xla_formula, axes, axis_name)
    return _kernel_or_xla(f"{name}_bwd", kernel_ok, axes, xla, out, cotangent), None


def _xla_softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    _, shifted, _, safe_sum = _shift_and_sum(masked_input(x, where), axes, axis_name)
    return (jnp.exp(shifted) / safe_sum).astype(x.dtype)


def _softmax_fwd(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    return _forward("softmax", _xla_softmax, x, where, axes, axis_name)


def _softmax_grad(axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array) -> jax.Array:
    compute = compute_dtype(probs.dtype)
    y = probs.astype(compute)
    g = cotangent.astype(compute)
    # Written without a select, this is one fused pass on CPU XLA (a guard on g costs a whole
    # extra materialised pass: benchmarks/NOTES.md). Zero-probability positions get exactly 0
    # for any finite cotangent.
    grad = y * (g - global_sum(g * y, axes, axis_name))
    return grad.astype(probs.dtype)


def _softmax_bwd(
    axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    return _backward("softmax", _softmax_grad, axes, axis_name, probs, cotangent)


def _masked_softmax_bwd(
    axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    # With an explicit mask, excluded positions neither receive nor pass on gradient even when the
    # incoming cotangent there is inf or NaN (the `where(mask, log(p), 0)` trap), as in jax.nn.
    guarded = jnp.where(probs == 0, jnp.zeros((), cotangent.dtype), cotangent)
    return _softmax_bwd(axes, axis_name, probs, guarded)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _softmax_fwd(x, where, axes, axis_name)[0]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _masked_softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _softmax_fwd(x, where, axes, axis_name)[0]


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
_masked_softmax.defvjp(_softmax_fwd, _masked_softmax_bwd)


# --------------------------------------------------------------------------------------------
# log_softmax


def _xla_log_softmax(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> jax.Array:
    _, shifted, _, safe_sum = _shift_and_sum(masked_input(x, where), axes, axis_name)
    # (x - m) - log(sum): subtracting log(sum) from the small shifted value keeps digits that
    # x - (m + log(sum)) loses at large |x|.
    return (shifted - jnp.log(safe_sum)).astype(x.dtype)


def _log_softmax_fwd(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    return _forward("log_softmax", _xla_log_softmax, x, where, axes, axis_name)


def _log_softmax_grad(
    axes: Axes, axis_name: Any, log_probs: jax.Array, cotangent: jax.Array
) -> jax.Array:
    compute = compute_dtype(log_probs.dtype)
    y = log_probs.astype(compute)
    # Masked (-inf) outputs are constants: their cotangent must not reach the sum.
    g = jnp.where(log_probs == -jnp.inf, 0, cotangent.astype(compute))
    grad = g - jnp.exp(y) * global_sum(g, axes, axis_name)
    return grad.astype(log_probs.dtype)


def _log_softmax_bwd(
    axes: Axes, axis_name: Any, log_probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    return _backward("log_softmax", _log_softmax_grad, axes, axis_name, log_probs, cotangent)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _log_softmax(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _log_softmax_fwd(x, where, axes, axis_name)[0]


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


# --------------------------------------------------------------------------------------------
# logsumexp (the core keeps the reduced axes; the public function squeezes them)


def _logsumexp_value(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any, with_probs: bool
) -> tuple[jax.Array, jax.Array | None]:
    row_max, shifted, sum_exp, safe_sum = _shift_and_sum(masked_input(x, where), axes, axis_name)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0)
    log_normalizer = jnp.where(row_max == jnp.inf, jnp.inf, shift + jnp.log(sum_exp))
    probs = (jnp.exp(shifted) / safe_sum).astype(x.dtype) if with_probs else None
    return log_normalizer.astype(x.dtype), probs


def _logsumexp_fwd(
    x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
    log_normalizer, probs = _logsumexp_value(x, where, axes, axis_name, with_probs=True)
    assert probs is not None
    return log_normalizer, probs


def _logsumexp_bwd(
    axes: Axes, axis_name: Any, probs: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, None]:
    # The cotangent is per slice (the same on every shard): each entry's gradient is its own
    # probability times it.
    compute = compute_dtype(probs.dtype)
    grad = probs.astype(compute) * cotangent.astype(compute)
    return grad.astype(probs.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logsumexp(x: jax.Array, where: jax.Array | None, axes: Axes, axis_name: Any) -> jax.Array:
    return _logsumexp_value(x, where, axes, axis_name, with_probs=False)[0]


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


# --------------------------------------------------------------------------------------------
# jitted entry points and the public API


def _broadcast_mask(where: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    return None if where is None else jnp.broadcast_to(where, shape)


# ``kernel_mode`` (JSOFTMAX_CPU_KERNEL) only keys the cache: the kernel is chosen while tracing.
@partial(jax.jit, static_argnames=("axes", "dtype", "axis_name", "kernel_mode"))
def _softmax_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    axis_name: Any = None,
    kernel_mode: str = "auto",
) -> jax.Array:
    x = x.astype(dtype)
    if where is None:
        return _softmax(x, None, axes, axis_name)
    return _masked_softmax(x, _broadcast_mask(where, x.shape), axes, axis_name)


@partial(jax.jit, static_argnames=("axes", "dtype", "axis_name", "kernel_mode"))
def _log_softmax_jit(
    x: jax.Array,
    where: jax.Array | None,
    axes: Axes,
    dtype: Any,
    axis_name: Any = None,
    kernel_mode: str = "auto",
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
    axis_name: Any = None,
) -> jax.Array:
    x = x.astype(dtype)
    out = _logsumexp(x, _broadcast_mask(where, x.shape), axes, axis_name)
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
      bf16/f16 are computed in float32 and rounded once. The backward pass is a hand-written
      ``jax.custom_vjp`` (``y * (g - sum(g * y))``) that saves only the output; forward-mode
      differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not available, use
      ``jax.jacrev(jax.jacrev(f))`` for second derivatives.

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
      computed in float32 and rounded once. The backward pass is a hand-written
      ``jax.custom_vjp`` (``g - exp(y) * sum(g)``) that saves only the output; forward mode is
      not available (see :func:`softmax`).

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
) -> jax.Array:
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

    Returns:
      ``x`` reduced over ``axis``, in ``x``'s (possibly cast) dtype.

    Note:
      An empty or fully masked slice gives -inf with gradient 0 (jax.nn gives a NaN gradient).
      Any +inf entry gives +inf. NaN in a slice gives NaN for that slice. The backward pass is a
      hand-written ``jax.custom_vjp`` (``softmax(x) * g``) that saves one array of ``x``'s size,
      the probabilities.

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
    if axis_name is not None:
        axis_size(axis_name, "logsumexp")
    return _logsumexp_jit(array, mask, axes, out_dtype, keepdims, axis_name)
