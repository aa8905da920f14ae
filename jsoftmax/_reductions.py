"""Reductions and dtype rules shared by every function of the core.

Each reduction runs over ``axes`` of the local array and, when ``axis_name`` is given (inside
``jax.shard_map``), across the devices of that mesh axis too: only per-slice values cross devices,
never the array. With ``axis_name=None`` they are the plain local reductions.
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


def masked_input(x: jax.Array, where: jax.Array | None) -> jax.Array:
    """``x`` in its compute dtype, with masked entries set to -inf."""
    compute = x.astype(compute_dtype(x.dtype))
    if where is None:
        return compute
    return jnp.where(where, compute, -jnp.inf)


def axis_size(axis_name: Any, fname: str) -> int:
    """Number of devices along ``axis_name``; a clear error when no shard_map binds it."""
    try:
        return int(lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"{fname}: axis_name expected a mesh axis bound by an enclosing jax.shard_map, "
            f"got {axis_name!r}"
        ) from err


def global_max(x: jax.Array, axes: Axes, axis_name: Any) -> jax.Array:
    """Maximum over ``axes`` (kept) and across ``axis_name``; a constant under differentiation."""
    # pmax has no differentiation rule; the maximum is a constant shift anyway.
    local_max = jnp.max(lax.stop_gradient(x), axis=axes, keepdims=True, initial=-jnp.inf)
    return local_max if axis_name is None else lax.pmax(local_max, axis_name)


def global_sum(x: Any, axes: Axes, axis_name: Any) -> Any:
    """Sum over ``axes`` (kept) and across ``axis_name``.

    ``x`` may be a tuple of arrays: the sums then cross devices in one all-reduce.
    """
    local_sum = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=axes, keepdims=True), x)
    return local_sum if axis_name is None else lax.psum(local_sum, axis_name)
