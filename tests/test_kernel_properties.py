"""Property test: the CPU kernels, the XLA path and a float64 reference agree (issue 12, item 8).

Hypothesis draws shapes, axes (ints, tuples, negative, None), layouts (the axes after the reduced
block holding fewer than 16, 16 to 128, or more than 128 entries: row kernels, column kernels
and the XLA path), dtypes and special values (-inf, +inf, NaN, fully masked slices, ``where=``
masks). Each example runs softmax and log_softmax forward and their VJP with
``JSOFTMAX_CPU_KERNEL=on`` and ``=off`` (read at trace time: each run is jitted afresh) and checks
both against one float64 reference with the full slice rules: NaN and +inf and -inf positions
identical, finite entries within a bound of a few roundings of the terms they are computed from.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import np_dtype, reverse_kernel, to_f64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jsoftmax
from jsoftmax import _kernel

ENV = "JSOFTMAX_CPU_KERNEL"
FUNCTIONS = {"softmax": jsoftmax.softmax, "log_softmax": jsoftmax.log_softmax}
# Deterministic: the same examples every run; a bounded number, as each one compiles four times.
PROFILE = settings(
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Allowed error per term, in units of the storage dtype's eps (float32: both paths compute in
# float32 and round a handful of times; bf16 / f16: the output, and the backward pass's input y,
# are rounded to the dtype once).
ULPS = {"float32": 16.0, "bfloat16": 2.0, "float16": 2.0}
# Sizes of the axes; their products give slices of 1 to a few thousand entries and column
# strides on either side of the column kernels' 16-128 range.
DIMS = (1, 2, 3, 5, 8, 16, 17, 33, 64, 129)
MAX_SIZE = 20_000


@st.composite
def cases(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from(DIMS), min_size=rank, max_size=rank)))
    if int(np.prod(shape)) > MAX_SIZE:
        shape = tuple(min(d, 8) for d in shape)
    kind = draw(st.sampled_from(["block", "block", "block", "any", "int", "none"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-rank, rank - 1))
    else:
        if kind == "block":  # one contiguous block: the kernels' case
            start = draw(st.integers(0, rank - 1))
            stop = draw(st.integers(start + 1, rank))
            axes = list(range(start, stop))
        else:
            axes = sorted(draw(st.sets(st.integers(0, rank - 1), min_size=1)))
        axis = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    specials = draw(st.sets(st.sampled_from(["-inf", "+inf", "nan", "masked_slice"]), max_size=3))
    mask = draw(st.sampled_from([None, "random", "random_with_empty_slice"]))
    return shape, axis, dtype, scale, seed, sorted(specials), mask


def _axes(axis, ndim) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))


def _first_slice(shape, axes) -> tuple:
    """Index of the first slice along ``axes`` (every kept axis at 0)."""
    return tuple(slice(None) if d in axes else 0 for d in range(len(shape)))


def _inputs(shape, axes, dtype, scale, seed, specials, mask):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    flat = x.reshape(-1)
    for special, value in (("-inf", -np.inf), ("+inf", np.inf), ("nan", np.nan)):
        if special in specials:
            flat[rng.integers(0, flat.size, size=max(1, flat.size // 50))] = value
    if "masked_slice" in specials:
        x[_first_slice(shape, axes)] = -np.inf
    where = None
    if mask is not None:
        where = rng.random(shape) > 0.3
        if mask == "random_with_empty_slice":
            where[_first_slice(shape, axes)] = False
    g = rng.standard_normal(shape)
    storage = np_dtype(dtype)
    return x.astype(np.float32).astype(storage), g.astype(np.float32).astype(storage), where


def _reference(x64, g64, axes, log, where):
    """float64 output and VJP with jsoftmax's rules: a NaN slice is NaN; a slice holding +inf
    gives its k +inf entries 1/k (log: -log k) and the rest 0 (log: -inf); an empty or fully
    masked slice gives 0 (log: -inf) and no gradient; with ``where``, zero-probability entries
    pass no cotangent (softmax), -inf outputs none (log_softmax)."""
    if where is not None:
        x64 = np.where(where, x64, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = np.max(x64, axis=axes, keepdims=True, initial=-np.inf)
        has_nan = np.any(np.isnan(x64), axis=axes, keepdims=True)
        pos_inf = top == np.inf
        shift = np.where(np.isfinite(top), top, 0.0)
        shifted = np.where(pos_inf, np.where(x64 == np.inf, 0.0, -np.inf), x64 - shift)
        total = np.sum(np.exp(shifted), axis=axes, keepdims=True)
        log_y = shifted - np.log(np.where(total == 0, 1.0, total))
        y = log_y if log else np.exp(log_y)
        if log:
            vec = np.where(log_y == -np.inf, 0.0, g64)
            dx = vec - np.exp(log_y) * np.sum(vec, axis=axes, keepdims=True)
            scale = np.abs(vec) + np.exp(log_y) * np.sum(np.abs(vec), axis=axes, keepdims=True)
            scale = scale * (1 + np.abs(np.where(np.isfinite(log_y), log_y, 0.0)))
        else:
            vec = g64 if where is None else np.where(y == 0, 0.0, g64)
            dot = np.sum(vec * y, axis=axes, keepdims=True)
            dx = y * (vec - dot)
            scale = y * (np.abs(vec) + np.sum(np.abs(vec * y), axis=axes, keepdims=True))
        y = np.where(has_nan, np.nan, y)
        dx = np.where(has_nan, np.nan, dx)
    return y, dx, scale


def _run(mode, x, g, axis, where):
    """{name: (y, dx)} for softmax and log_softmax in one function jitted afresh with
    ``JSOFTMAX_CPU_KERNEL=mode``, and the jsoftmax custom-call targets it lowered."""

    def values_and_vjps(x, g):
        out = {}
        for name, fn in FUNCTIONS.items():
            y, pullback = jax.vjp(lambda x, fn=fn: fn(x, axis=axis, where=where), x)
            out[name] = (y, pullback(g)[0])
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, mode)
        compiled = jax.jit(values_and_vjps).lower(x, g).compile()
        out = jax.tree_util.tree_map(np.asarray, compiled(x, g))
    return out, set(re.findall(r'custom_call_target="(jsoftmax_\w+)"', compiled.as_text()))


def _check(got, exact, bound, what):
    got64 = to_f64(got)
    for test in (np.isnan, np.isposinf, np.isneginf):
        differ = np.argwhere(test(got64) != test(exact))
        assert differ.size == 0, (
            f"{what}: {test.__name__} differs at {differ[:3].tolist()}: "
            f"{got64[tuple(differ[0])]} vs {exact[tuple(differ[0])]}"
        )
    finite = np.isfinite(exact)
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same inf
        error = np.abs(got64 - exact)
    bad = np.argwhere(finite & ~(error <= bound))
    assert bad.size == 0, (
        f"{what}: {len(bad)} entries off, first at {bad[0].tolist()}: {got64[tuple(bad[0])]!r} vs "
        f"{exact[tuple(bad[0])]!r} (bound {bound[tuple(bad[0])]:.3g})"
    )


@PROFILE
@given(cases())
def test_kernels_xla_path_and_float64_agree(case):
    shape, axis, dtype, scale, seed, specials, mask = case
    axes = _axes(axis, len(shape))
    x, g, where = _inputs(shape, axes, dtype, scale, seed, specials, mask)
    x, g = jnp.asarray(x), jnp.asarray(g)
    eps = float(ml_dtypes.finfo(np_dtype(dtype)).eps)
    per_term = ULPS[dtype] * eps + (
        16 * float(np.finfo(np.float32).eps) if dtype != "float32" else 0
    )
    # Below float32's smallest normal, results may be flushed to 0 (XLA's CPU code and the
    # kernels both compute in float32); float16 keeps its own subnormals, a step apart.
    tiny = float(np.finfo(np.float32).tiny) + float(
        ml_dtypes.finfo(np_dtype(dtype)).smallest_subnormal
    )
    expected_kernel = _kernel.eligible(jnp.zeros(shape, dtype), axes, None)
    x64 = to_f64(x)
    with np.errstate(invalid="ignore"):
        finite_x = np.where(np.isfinite(x64), x64, -np.inf)
        top = np.max(finite_x, axis=axes, keepdims=True, initial=-np.inf)
        shift_gap = np.where(np.isfinite(x64) & np.isfinite(top), x64 - top, 0.0)
    runs = {mode: _run(mode, x, g, axis, where) for mode in ("on", "off")}
    assert not runs["off"][1]
    if expected_kernel:
        # The outputs are returned: the backward kernels start from them.
        masked = where is not None
        assert {t.replace("_columns", "") for t in runs["on"][1]} == {
            kernel
            for name in FUNCTIONS
            for kernel in (f"jsoftmax_{name}_fwd", reverse_kernel(name, dtype, masked=masked))
        }, runs["on"][1]
    else:
        assert not runs["on"][1], runs["on"][1]
    for name in FUNCTIONS:
        log = name == "log_softmax"
        y_exact, dx_exact, dx_scale = _reference(to_f64(x), to_f64(g), axes, log, where)
        finite_y = np.where(np.isfinite(y_exact), y_exact, 0.0)
        # x - max rounded in float32 (half an ulp of it, absolute: a relative error of exp) is
        # inherent to any float32 implementation that shifts by the maximum.
        shift_error = 0.5 * np.spacing(np.abs(shift_gap).astype(np.float32)).astype(np.float64)
        if log:  # (x - max) - log(sum): the error of log(sum) is absolute, a few ulps of max(1, L)
            y_bound = shift_error + per_term * (np.abs(finite_y) + 8 * (1 + np.abs(finite_y)))
        else:
            y_bound = (shift_error + per_term) * np.abs(finite_y)
        y_bound = y_bound + tiny
        # The backward pass starts from each path's own rounded y: one more rounding per term.
        # A probability below float32's smallest normal may be flushed to 0 in the forward pass,
        # which zeroes its gradient y (g - sum(g y)): up to tiny (|g| + |sum(g y)|).
        dx_bound = 4 * per_term * dx_scale + 2 * tiny * (1 + np.max(np.abs(to_f64(g)), initial=0))
        for mode, (outputs, _) in runs.items():
            y, dx = outputs[name]
            what = f"{name} {dtype} {shape} axis={axis} {specials} mask={mask} mode={mode}"
            _check(y, y_exact, y_bound, f"{what} forward")
            _check(dx, dx_exact, dx_bound, f"{what} vjp")
