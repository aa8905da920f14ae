"""The size of a mesh axis, with the error every function of the core gives outside shard_map."""

from __future__ import annotations

from typing import Any

from jax import lax

Axes = tuple[int, ...]


def axis_size(axis_name: Any, fname: str) -> int:
    """Number of devices along ``axis_name``; a clear error when no shard_map binds it."""
    try:
        return int(lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"{fname}: axis_name expected a mesh axis bound by an enclosing jax.shard_map, "
            f"got {axis_name!r}"
        ) from err
