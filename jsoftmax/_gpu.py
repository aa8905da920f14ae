"""A Pallas (Triton) kernel for softmax / log_softmax over long rows on NVIDIA GPUs.

XLA fuses a whole softmax into one kernel only while a row fits its one-pass Triton softmax; past
that (rows of 64k+ entries) it splits the computation into four reductions and a final pass
(five kernels for ``jax.nn.softmax`` on an H100 at 64x262144). This kernel does one program per
row in two sweeps: an online pass that keeps the running maximum and the rescaled sum, then a
pass that writes the output: two reads and one write in one launch.

The rules are ``_formula.py``'s: -inf entries and fully masked rows give 0 / -inf, +inf entries
share the row, NaN makes the row NaN (checked explicitly: Triton's max ignores NaN).
Its values are tested on CPU with ``interpret=True``; its compilation for the H100 with XLA's
ahead-of-time compiler (tests/test_accelerators.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Rows at least this long take the kernel: below it XLA's own one-kernel softmax applies.
MIN_ROW = 65536
_BLOCK = 4096


def _row_kernel(x_ref: Any, out_ref: Any, *, n: int, log: bool) -> None:
    row = pl.program_id(0)
    lowest = jnp.float32(jnp.finfo(jnp.float32).min)

    def load(block: jax.Array) -> tuple[jax.Array, jax.Array]:
        index = block * _BLOCK + jnp.arange(_BLOCK)
        values = plt.load(
            x_ref.at[row, pl.ds(block * _BLOCK, _BLOCK)], mask=index < n, other=-jnp.inf
        )
        return values.astype(jnp.float32), index < n

    def shifted(values: jax.Array, shift: jax.Array) -> jax.Array:
        return jnp.where(values == jnp.inf, jnp.float32(0), values - shift)

    def accumulate(block: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        shift, total, nans = carry
        values, _ = load(block)
        new_shift = jnp.maximum(jnp.maximum(shift, jnp.max(values)), lowest)
        # Rescale the running sum to the new shift (an unchanged shift, +inf included: 1).
        rescale = jnp.where(shift == new_shift, jnp.float32(1), jnp.exp(shift - new_shift))
        total = total * rescale + jnp.sum(jnp.exp(shifted(values, new_shift)))
        return new_shift, total, nans + jnp.sum((values != values).astype(jnp.int32))

    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    blocks = pl.cdiv(n, _BLOCK)
    shift, total, nans = lax.fori_loop(0, blocks, accumulate, (lowest, tiny, jnp.int32(0)))

    def write(block: jax.Array, carry: int) -> int:
        values, valid = load(block)
        z = shifted(values, shift)
        out = z - jnp.log(total) if log else jnp.exp(z) / total
        out = jnp.where(nans > 0, jnp.float32(jnp.nan), out)
        target = out_ref.at[row, pl.ds(block * _BLOCK, _BLOCK)]
        plt.store(target, out.astype(out_ref.dtype), mask=valid)
        return carry

    lax.fori_loop(0, blocks, write, 0)


def long_rows(x: jax.Array, *, log: bool, interpret: bool = False) -> jax.Array:
    """softmax / log_softmax over the last axis of a 2-D ``x``, one program per row."""
    rows, n = x.shape
    params = None if interpret else plt.CompilerParams(num_warps=8, num_stages=1)
    kernel = pl.pallas_call(
        partial(_row_kernel, n=n, log=log),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(rows,),
        interpret=interpret,
        compiler_params=params,
    )
    out: jax.Array = kernel(x)
    return out


def applies(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    """Whether the kernel computes this call: one long trailing reduced axis."""
    return len(shape) >= 1 and axes == (len(shape) - 1,) and shape[-1] >= MIN_ROW
