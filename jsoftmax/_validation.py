"""Argument checks shared by the public functions.

Every public function validates once, at its boundary, and every message has the same shape:
``"<function>: <argument> expected <what>, got <what>"``. ``TypeError`` is raised for kinds and
dtypes, ``ValueError`` for shapes and axes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Python scalars are accepted as jax.numpy accepts them; lists, strings and None are not.
_SCALAR_TYPES = (bool, int, float, np.generic)


def _is_numeric(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number)) or dtype == np.bool_


def is_arraylike(value: Any) -> bool:
    """A JAX array, or a numpy array or scalar of a numeric or bool dtype (not str or object)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return _is_numeric(value.dtype)
    return isinstance(value, (jax.Array, *_SCALAR_TYPES))


def check_input(x: Any, dtype: Any, fname: str, argname: str = "x") -> tuple[jax.Array, Any]:
    """Returns ``(array, out_dtype)``: ``x`` as a JAX array and the floating dtype to compute in.

    ``dtype`` (if given) must be a floating dtype: ``x`` is cast to it first, as torch's
    ``dtype=`` does. Otherwise bool and integer inputs promote as ``jax.nn`` promotes them
    (64-bit integers to float64 when x64 is on, all others to float32). The cast itself happens
    inside the jitted function, fused with the rest.
    """
    if isinstance(x, jax.Array):
        array = x  # the common case: no conversion, no dispatch
    elif is_arraylike(x):
        array = jnp.asarray(x)
    elif isinstance(x, (np.ndarray, np.generic)):
        raise TypeError(
            f"{fname}: {argname} expected a numeric (bool, integer or floating) array, "
            f"got dtype {x.dtype}"
        )
    else:
        raise TypeError(
            f"{fname}: {argname} expected a jax.Array, numpy array or scalar, "
            f"got {type(x).__name__}"
        )
    try:
        hash(dtype)
    except TypeError as err:
        raise TypeError(f"{fname}: dtype expected a floating dtype, got {dtype!r}") from err
    # The widest float JAX holds now (x64 is a thread-local setting) keys the cache.
    widest = jax.dtypes.canonicalize_dtype(np.float64)
    return array, _output_dtype(array.dtype, dtype, widest, fname, argname)


# The decisions below depend only on hashable metadata, so they are cached: a call with the same
# dtypes and axes as an earlier one pays a dictionary lookup, not the checks (errors are never
# cached).
@functools.lru_cache(maxsize=512)
def _output_dtype(in_dtype: Any, dtype: Any, widest: Any, fname: str, argname: str) -> Any:
    if jnp.issubdtype(in_dtype, jnp.complexfloating):
        raise TypeError(f"{fname}: {argname} expected a real array, got dtype {in_dtype}")
    if dtype is not None:
        try:
            target = jnp.dtype(dtype)
        except TypeError as err:
            raise TypeError(f"{fname}: dtype expected a floating dtype, got {dtype!r}") from err
        if not jnp.issubdtype(target, jnp.floating):
            raise TypeError(f"{fname}: dtype expected a floating dtype, got {target}")
        return jax.dtypes.canonicalize_dtype(target)
    if jnp.issubdtype(in_dtype, jnp.floating):
        return in_dtype
    # jax.nn's rule (that of jnp.exp): 64-bit integers become the widest float, narrower
    # integers and bool float32.
    wide_integer = jnp.issubdtype(in_dtype, jnp.integer) and jnp.dtype(in_dtype).itemsize == 8
    return widest if wide_integer else jnp.dtype(jnp.float32)


def check_ignore_index(ignore_index: int, labels_dtype: Any, fname: str) -> None:
    """ValueError unless integer labels of ``labels_dtype`` can hold ``ignore_index``."""
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        return  # probability targets: unused
    info = jnp.iinfo(labels_dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"{fname}: ignore_index expected an int in [{info.min}, {info.max}] (the range of "
            f"the labels' dtype {jnp.dtype(labels_dtype)}), got {ignore_index}"
        )


def normalize_axes(axis: Any, ndim: int, fname: str) -> tuple[int, ...]:
    """Turns ``axis`` (int, tuple of ints or None for all axes) into sorted non-negative axes."""
    if isinstance(axis, list):
        axis = tuple(axis)
    # Only exact ints reach the cache: True and 1.0 hash and compare equal to 1, and must not hit
    # a cached entry for axis=1.
    items = axis if isinstance(axis, tuple) else (axis,)
    if all(type(item) is int for item in items):
        return _normalize_axes_cached(axis, ndim, fname)
    return _normalize_axes_cached.__wrapped__(axis, ndim, fname)


@functools.lru_cache(maxsize=512)
def _normalize_axes_cached(axis: Any, ndim: int, fname: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    raw: Sequence[Any] = axis if isinstance(axis, (tuple, list)) else (axis,)
    if ndim == 0 and raw:
        # jax.nn raises here too ("axis -1 is out of bounds for array of dimension 0").
        raise ValueError(
            f"{fname}: axis expected None or () for a 0-d x (an array of rank 0 has no axes; "
            f"None or () takes its one element as the slice), got {axis!r}"
        )
    axes = []
    for item in raw:
        if isinstance(item, bool):
            raise TypeError(f"{fname}: axis expected an int or a tuple of ints, got {axis!r}")
        try:
            index = operator.index(item)
        except TypeError as err:
            raise TypeError(
                f"{fname}: axis expected an int or a tuple of ints, got {axis!r}"
            ) from err
        if not -ndim <= index < ndim:
            raise ValueError(
                f"{fname}: axis expected values in [{-ndim}, {ndim}) for an array of rank {ndim}, "
                f"got {axis!r}"
            )
        axes.append(index % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"{fname}: axis expected distinct axes for an array of rank {ndim}, got duplicated "
            f"axes in {axis!r}"
        )
    return tuple(sorted(axes))


def as_mask(where: Any, shape: tuple[int, ...], fname: str) -> jax.Array | None:
    """Checks ``where`` is a boolean array that broadcasts to ``shape``; returns it or None.

    The mask is returned unbroadcast: the jitted kernels broadcast it inside the fusion, so a
    small mask is never materialised at the size of ``x``.
    """
    if where is None:
        return None
    if not is_arraylike(where):
        raise TypeError(f"{fname}: where expected a boolean array, got {type(where).__name__}")
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{fname}: where expected a boolean array, got dtype {mask.dtype}")
    try:
        broadcast = np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"{fname}: where expected a shape that broadcasts to x's shape {tuple(shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return mask
