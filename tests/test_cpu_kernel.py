"""The CPU kernels (jsoftmax/_cpu/kernels.cc, loaded by jsoftmax/_kernel.py) against the XLA path.

The kernels and the XLA path are two implementations of the same row rules, so most tests here
compute one thing twice, with ``JSOFTMAX_CPU_KERNEL=on`` and ``=off`` (the public functions and
every function jitted here retrace when it changes), and compare; each comparison also checks, in
the lowered StableHLO, that "on" really called the kernels and "off" did not. The rest covers:

* accuracy of the kernels against float64 references, with per-entry bounds derived from the
  float32 operations involved;
* when the XLA path is kept (float64, non-trailing axes, ``where=`` on the forward pass,
  ``axis_name``, empty arrays, mode "off", lowering for CUDA) and when the kernels are lowered;
* transformations around the kernels: vmap, grad, grad of grad, jacrev(jacrev), checkpoint, scan;
* ``auto`` mode (XLA path with this process's 8 simulated devices, the kernels in a fresh
  one-device process), every instruction-set variant against the XLA path (each in a fresh
  process forced with ``JSOFTMAX_CPU_ISA``), damaged or stale libraries refused with a warning,
  bad mode values, what :func:`jsoftmax.cpu_kernel_info` reports, explicitly sharded inputs, and
  the torch interop in both modes.

Tolerances: float32 results of the two paths differ by rounding only (a different exp
polynomial, summation order and reciprocal-multiply against division), so they are compared with
bounds of a few float32 ulps of the terms each result is computed from; bfloat16 / float16 are
computed in float32 by both and rounded once, so they must be within 1 ulp of the storage dtype.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import (
    enable_x64,
    ref_log_softmax,
    ref_softmax,
    relative_error,
    reverse_kernel,
    to_f64,
)
from jax import lax

import jsoftmax
from jsoftmax import _kernel, _primitives
from jsoftmax._primitives import vjp_from_output
from jsoftmax._validation import normalize_axes

ENV = "JSOFTMAX_CPU_KERNEL"
FUNCTIONS = {"softmax": jsoftmax.softmax, "log_softmax": jsoftmax.log_softmax}
REFERENCES = {"softmax": ref_softmax, "log_softmax": ref_log_softmax}
REFERENCE_JAX = {"softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax}
LOW_PRECISION = ("bfloat16", "float16")
EPS32 = float(np.finfo(np.float32).eps)
# Multiples of float32 eps allowed per term of a result (a handful of roundings in each path).
F32_ULPS = 16.0


# --------------------------------------------------------------------------------------------
# helpers


def _targets(hlo_text: str) -> set[str]:
    """The jsoftmax custom-call targets in lowered StableHLO or compiled HLO text. A jitted
    float32 reverse pass lowers both backward kernels behind a conditional on a saved scalar
    (from the output where it is used, else from the input) that XLA folds: the compiled text
    says which runs."""
    found = re.findall(r'custom_call @(jsoftmax_\w+)|custom_call_target="(jsoftmax_\w+)"', hlo_text)
    return {lowered or compiled for lowered, compiled in found}


def _np(array) -> np.ndarray:
    return np.asarray(array)


def _logits(shape, dtype="float32", seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _value_and_vjp(monkeypatch, mode, name, x, g, axis=-1):
    """(y, dx, compiled HLO) of ``FUNCTIONS[name](x, axis)`` and its VJP at ``g``, jitted
    afresh."""
    monkeypatch.setenv(ENV, mode)
    fn = FUNCTIONS[name]

    def value_and_vjp(x, g):
        y, pullback = jax.vjp(lambda x: fn(x, axis=axis), x)
        return y, pullback(g)[0]

    compiled = jax.jit(value_and_vjp).lower(x, g).compile()
    y, dx = compiled(x, g)
    return _np(y), _np(dx), compiled.as_text()


def _vjp_from_input(x, g, *, axes, log):
    """The backward kernel that starts from the input, at any dtype (JAX's reverse mode takes it
    for float32 only)."""
    return _primitives.tangent_p.bind(
        x, g, axes=axes, axis_name=None, log=log, masked=False, kernel=True, transposed=True,
        from_input=True,
    )  # fmt: skip


def _both_backward_kernels(monkeypatch, name, x, y, g, axis=-1):
    """dx from each backward kernel, called directly: (from the input x, from the output y).
    JAX's reverse mode runs one of them (from x for a float32 gradient whose output is dead,
    else from y), the torch side the one from y; both stay checked at every dtype."""
    monkeypatch.setenv(ENV, "on")
    axes = normalize_axes(axis, x.ndim, name)
    log = name != "softmax"
    from_x = jax.jit(partial(_vjp_from_input, axes=axes, log=log)).lower(x, g)
    from_y = jax.jit(partial(vjp_from_output, axes=axes, log=log)).lower(y, g)
    suffix = "_columns" if _kernel._layout(x.shape, axes)[2] != 1 else ""
    assert _targets(from_x.as_text()) == {f"jsoftmax_{name}_bwd_from_input{suffix}"}
    assert _targets(from_y.as_text()) == {f"jsoftmax_{name}_bwd{suffix}"}
    return _np(from_x.compile()(x, g)), _np(from_y.compile()(y, g))


def _assert_switched(name, hlo_on, hlo_off, passes=("fwd", "bwd"), optional=()):
    # A jitted call that returns the output and the gradient runs the forward kernel and the
    # backward one from the output (the default ``passes``); a float32 gradient alone, the
    # backward kernel from the input and no forward kernel. ``optional``: targets that may or
    # may not remain.
    expected = {f"jsoftmax_{name}_{which}" for which in passes}
    allowed = expected | {f"jsoftmax_{name}_{which}" for which in optional}
    got = _targets(hlo_on)
    assert expected <= got <= allowed, f"mode on lowered {got}, not {expected} (+ {allowed})"
    assert not _targets(hlo_off), f"mode off still lowered {_targets(hlo_off)}"


def _assert_same_nonfinite(a: np.ndarray, b: np.ndarray, what: str) -> None:
    a64, b64 = to_f64(a), to_f64(b)
    for test in (np.isnan, np.isposinf, np.isneginf):
        mismatch = np.argwhere(test(a64) != test(b64))
        assert mismatch.size == 0, (
            f"{what}: {test.__name__} differs at {mismatch[:5].tolist()}: "
            f"{a64[tuple(mismatch[0])]} vs {b64[tuple(mismatch[0])]}"
        )


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Steps between two 16-bit float arrays (bf16 / f16) in the order of their values."""

    def ordered(array):
        bits = np.ascontiguousarray(array).view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(ordered(a) - ordered(b))


def _assert_close(a, b, bound, dtype, what):
    """``a`` and ``b`` agree: same NaN/inf positions; finite entries within ``bound`` (float64,
    per entry) or, for bf16/f16, within 1 ulp of the dtype."""
    _assert_same_nonfinite(a, b, what)
    a64, b64 = to_f64(a), to_f64(b)
    finite = np.isfinite(a64)
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same inf
        ok = np.abs(a64 - b64) <= bound
    if dtype in LOW_PRECISION:
        ok |= _ulp_distance(a, b) <= 1
    bad = np.argwhere(finite & ~ok)
    if bad.size:
        first = tuple(bad[0])
        limit = np.broadcast_to(bound, a64.shape)[first]
        raise AssertionError(
            f"{what}: {len(bad)} entries differ, first at {list(first)}: "
            f"{a64[first]!r} vs {b64[first]!r} (bound {limit!r})"
        )


def _rows(array, axis):
    """``array`` in float64 with the reduced axes flattened last: (rows, n)."""
    a = to_f64(array)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(sorted(ax % a.ndim for ax in axes))
    kept = [ax for ax in range(a.ndim) if ax not in axes]
    moved = np.transpose(a, kept + list(axes))
    n = int(np.prod([a.shape[ax] for ax in axes]))
    return moved.reshape(-1, n), moved.shape, kept + list(axes)


def _unrows(rows, moved_shape, order, shape):
    return np.transpose(rows.reshape(moved_shape), np.argsort(order)).reshape(shape)


def _forward_bound(name, y, axis):
    """Per-entry bound for two float32 evaluations of the forward pass (``y``: one of them).

    softmax: each result carries a few roundings relative to itself. log_softmax is
    ``(x - max) - L``, ``L = log(sum(exp(x - max)))``: both paths form ``x - max`` identically, so
    they differ by their L (a few ulps of max(1, L)) plus the final rounding (ulps of the result).
    """
    y = to_f64(y)
    with np.errstate(invalid="ignore"):
        if name == "softmax":
            return F32_ULPS * EPS32 * np.where(np.isfinite(y), np.abs(y), 0.0)
        rows, moved_shape, order = _rows(y, axis)
        finite_rows = np.where(np.isfinite(rows), rows, -np.inf)
        big_l = -np.max(finite_rows, axis=1, keepdims=True)  # L = -max(log_softmax)
        big_l = np.where(np.isfinite(big_l), np.abs(big_l), 0.0)
        scale = np.broadcast_to(np.maximum(1.0, big_l), rows.shape)
        scale = _unrows(scale, moved_shape, order, y.shape)
        return F32_ULPS * EPS32 * (scale + np.abs(np.where(np.isfinite(y), y, 0.0)))


def _backward_bound(name, y, g, axis, dtype="float32"):
    """Per-entry bound for two float32 evaluations of the backward pass (``y``: an output).

    softmax ``dx = y (g - sum(g y))``: errors scale with ``|y| (|g| + sum|g y|)``, not with
    ``|dx|``, which cancels where ``g`` is near the row's ``sum(g y)``. log_softmax
    ``dx = g' - exp(y) sum(g')``: errors scale with ``|g'| + exp(y) sum|g'| (max(1, L) + |y|)``
    (an absolute error ``e`` in ``y`` is a relative error ``e`` in ``exp(y)``).

    With bf16/f16 ``dtype`` the two paths' outputs ``y`` may differ by 1 ulp of the dtype (a
    relative ``eps``), which the backward pass carries through the same terms: the bound then
    adds ``2 eps`` of the dtype per term, and two subnormal steps for results in that range.
    """
    y_rows, moved_shape, order = _rows(y, axis)
    g_rows = _rows(g, axis)[0]
    with np.errstate(invalid="ignore", over="ignore"):
        if name == "softmax":
            dot = np.sum(np.abs(g_rows * y_rows), axis=1, keepdims=True)
            scale = np.abs(y_rows) * (np.abs(g_rows) + dot)
        else:
            guarded = np.where(y_rows == -np.inf, 0.0, np.abs(g_rows))
            probs = np.exp(y_rows)
            finite_y = np.where(np.isfinite(y_rows), y_rows, -np.inf)
            big_l = -np.max(finite_y, axis=1, keepdims=True)
            big_l = np.where(np.isfinite(big_l), np.abs(big_l), 0.0)
            total = np.sum(guarded, axis=1, keepdims=True)
            finite_abs_y = np.where(np.isfinite(y_rows), np.abs(y_rows), 0.0)
            scale = guarded + probs * total * (np.maximum(1.0, big_l) + finite_abs_y)
    scale = np.where(np.isfinite(scale), scale, 0.0)
    per_term = F32_ULPS * EPS32
    floor = 0.0
    if dtype in LOW_PRECISION:
        info = ml_dtypes.finfo(_storage(dtype))
        per_term += 2 * float(info.eps)
        # Results in the subnormal range are rounded to a fixed spacing, not a relative one: a
        # 1-ulp difference in y can move a subnormal dx by 2 steps of that spacing.
        floor = 2 * float(info.smallest_subnormal)
    return per_term * _unrows(scale, moved_shape, order, to_f64(y).shape) + floor


def _storage(dtype: str):
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def _edge_logits(dtype: str) -> tuple[jax.Array, list[str]]:
    """Rows of 37 (odd, 2 blocks of 16 and a partial one) mixing every row rule."""
    n = 37
    rng = np.random.default_rng(7)
    big = 6e4 if dtype == "float16" else 3e38  # near the dtype's largest finite value
    inf = np.inf
    rows: dict[str, np.ndarray] = {}
    base = (rng.standard_normal((14, n)) * 3).astype(np.float32)
    rows["plain"] = base[0]
    rows["nan"] = np.where(np.arange(n) == 5, np.nan, base[1])
    rows["nan_and_inf"] = np.where(np.arange(n) == 3, np.nan, np.where(np.arange(n) == 30, inf, 0))
    rows["all_minus_inf"] = np.full(n, -inf)
    rows["one_plus_inf"] = np.where(np.arange(n) == 33, inf, base[2])  # in the partial block
    rows["three_plus_inf"] = np.where(np.isin(np.arange(n), [0, 17, 36]), inf, base[3])
    rows["plus_and_minus_inf"] = np.where(np.arange(n) % 2 == 0, -inf, inf)
    rows["some_minus_inf"] = np.where(np.arange(n) % 3 == 0, -inf, base[4])
    rows["one_finite"] = np.where(np.arange(n) == 20, 1.5, -inf)
    rows["huge"] = np.where(np.arange(n) % 2 == 0, big, -big) * np.where(base[5] > 0, 1, 0.5)
    rows["huge_and_small"] = np.concatenate([[big, -big, 0.0, 1.0], base[6][4:]])
    rows["equal_large"] = np.full(n, big / 2)
    rows["wide_range"] = base[7] * 40  # exps spanning float32's whole range, some flushed
    rows["tail_max"] = np.where(np.arange(n) == n - 1, 50.0, base[8])  # max in the partial block
    names = list(rows)
    values = np.stack([rows[key] for key in names]).astype(np.float32)
    return jnp.asarray(values).astype(dtype), names


# --------------------------------------------------------------------------------------------
# 1. the kernels agree with the XLA path


SHAPES_AND_AXES = [
    ((1,), -1),
    ((3,), -1),
    ((1, 15), -1),
    ((4, 16), -1),
    ((5, 17), -1),
    ((1, 1000), -1),
    ((3, 4099), -1),
    ((701, 101), -1),  # many rows (70801 entries): split over XLA's thread pool
    ((3, 5, 19), -1),
    ((3, 5, 19), (-2, -1)),  # a trailing block of two axes: one row of 95 per leading index
]


def _check_against_xla_path(monkeypatch, name, dtype, shape, axis, seed, columns=False):
    """Forward and VJP with the kernels (row or column targets) equal the XLA path's."""
    x = _logits(shape, dtype, seed=seed)
    g = _logits(shape, dtype, seed=seed + 1, scale=1.0)
    y_on, dx_on, hlo_on = _value_and_vjp(monkeypatch, "on", name, x, g, axis)
    y_off, dx_off, hlo_off = _value_and_vjp(monkeypatch, "off", name, x, g, axis)
    suffix = "_columns" if columns else ""
    # The output is returned: the backward kernel starts from it.
    expected = {f"jsoftmax_{name}_fwd{suffix}", reverse_kernel(name, dtype, suffix=suffix)}
    assert _targets(hlo_on) == expected, f"mode on lowered {_targets(hlo_on)}, not {expected}"
    assert not _targets(hlo_off), f"mode off still lowered {_targets(hlo_off)}"
    assert y_on.dtype == y_off.dtype == x.dtype and y_on.shape == shape
    assert dx_on.dtype == dx_off.dtype == x.dtype and dx_on.shape == shape
    _assert_close(y_on, y_off, _forward_bound(name, y_off, axis), dtype, f"{name} forward")
    bwd_bound = _backward_bound(name, y_off, g, axis, dtype)
    _assert_close(dx_on, dx_off, bwd_bound, dtype, f"{name} vjp")
    both = _both_backward_kernels(monkeypatch, name, x, y_on, g, axis)
    for dx, source in zip(both, "xy", strict=True):
        _assert_close(dx, dx_off, bwd_bound, dtype, f"{name} vjp from {source}")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AND_AXES)
def test_kernel_matches_xla_path(monkeypatch, name, dtype, shape, axis):
    _check_against_xla_path(monkeypatch, name, dtype, shape, axis, seed=1)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_large_output_matches_xla_path(monkeypatch, name, dtype):
    # Over 2^21 entries in rows of over 4096 (4.3-8.5 MB per output): the kernels advise huge
    # pages on its 2 MiB-aligned interior, and float16 log_softmax's forward pass reads the row
    # in every pass rather than a float32 copy (forward_copies in kernels.cc).
    x = _logits((520, 4099), dtype, seed=25)
    g = _logits((520, 4099), dtype, seed=26, scale=1.0)
    y_on, dx_on, hlo_on = _value_and_vjp(monkeypatch, "on", name, x, g)
    y_off, dx_off, hlo_off = _value_and_vjp(monkeypatch, "off", name, x, g)
    _assert_switched(name, hlo_on, hlo_off)
    _assert_close(y_on, y_off, _forward_bound(name, y_off, -1), dtype, f"{name} forward")
    bwd_bound = _backward_bound(name, y_off, g, -1, dtype)
    _assert_close(dx_on, dx_off, bwd_bound, dtype, f"{name} vjp")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 15, 17, 4099])
def test_backward_kernel_matches_xla_rule_on_the_same_output(monkeypatch, name, dtype, n):
    # The backward rules alone, fed one and the same output y (the float64 result rounded to the
    # dtype, -inf / 0 entries included): no forward difference to carry, so bf16/f16 must be
    # within 1 ulp of the dtype or the float32 bound.
    log = name == "log_softmax"
    x = np.array(_logits((6, n), seed=23), np.float32)
    x[1, ::4] = -np.inf
    x[2] = -np.inf
    y = jnp.asarray(REFERENCES[name](x)).astype(dtype)
    g = _logits((6, n), dtype, seed=24, scale=1.0)
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)
        lowered = jax.jit(lambda y, g: vjp_from_output(y, g, (1,), log=log)).lower(y, g)
        results[mode] = (_np(lowered.compile()(y, g)), _targets(lowered.as_text()))
    assert results["on"][1] == {f"jsoftmax_{name}_bwd"} and not results["off"][1]
    bound = _backward_bound(name, y, g, -1)
    _assert_close(results["on"][0], results["off"][0], bound, dtype, f"{name} backward rule")
    np.testing.assert_array_equal(to_f64(results["on"][0])[2], 0.0)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kernel_matches_xla_path_on_edge_rows(monkeypatch, name, dtype):
    x, row_names = _edge_logits(dtype)
    g = _logits(x.shape, dtype, seed=3, scale=1.0)
    y_on, dx_on, hlo_on = _value_and_vjp(monkeypatch, "on", name, x, g)
    y_off, dx_off, hlo_off = _value_and_vjp(monkeypatch, "off", name, x, g)
    _assert_switched(name, hlo_on, hlo_off)
    dx_from_x, dx_from_y = _both_backward_kernels(monkeypatch, name, x, y_on, g)
    fwd_bound = _forward_bound(name, y_off, -1)
    bwd_bound = _backward_bound(name, y_off, g, -1, dtype)
    for row, row_name in enumerate(row_names):
        what = f"{name} {dtype} row {row_name!r}"
        _assert_close(y_on[row], y_off[row], fwd_bound[row], dtype, f"{what} forward")
        _assert_close(dx_on[row], dx_off[row], bwd_bound[row], dtype, f"{what} vjp")
        _assert_close(dx_from_x[row], dx_off[row], bwd_bound[row], dtype, f"{what} from x")
        _assert_close(dx_from_y[row], dx_off[row], bwd_bound[row], dtype, f"{what} from y")


# Column kernels: a block of reduced axes followed by at least 16 entries ([outer, n, inner]).
COLUMN_SHAPES_AND_AXES = [
    ((20, 16), 0),  # inner exactly one lane block
    ((2, 100, 17), 1),  # a full block and a partial one of 1 lane
    ((7, 33, 40), 1),  # partial block of 8 lanes
    ((3, 37, 5, 40), (1, 2)),  # two reduced axes in the middle
    ((64, 301, 32), 1),  # enough units to split over the thread pool
]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("shape", "axis"), COLUMN_SHAPES_AND_AXES)
def test_column_kernel_matches_xla_path(monkeypatch, name, dtype, shape, axis):
    _check_against_xla_path(monkeypatch, name, dtype, shape, axis, seed=31, columns=True)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_column_kernel_on_edge_slices(monkeypatch, name, dtype):
    # The edge rows as columns (reduced over axis 0), twice side by side so that 16 lanes hold
    # different rules at once; then the same per-slice comparison as for the row kernels.
    rows, row_names = _edge_logits(dtype)
    x = jnp.concatenate([rows, rows[::-1]], axis=0).T  # [n, 2 * rows]: slices are columns
    names = row_names + row_names[::-1]
    g = _logits(x.shape, dtype, seed=33, scale=1.0)
    y_on, dx_on, hlo_on = _value_and_vjp(monkeypatch, "on", name, x, g, 0)
    y_off, dx_off, hlo_off = _value_and_vjp(monkeypatch, "off", name, x, g, 0)
    assert f"jsoftmax_{name}_fwd_columns" in _targets(hlo_on) and not _targets(hlo_off)
    fwd_bound = _forward_bound(name, y_off, 0)
    bwd_bound = _backward_bound(name, y_off, g, 0, dtype)
    for column, column_name in enumerate(names):
        what = f"{name} {dtype} column {column_name!r}"
        _assert_close(
            y_on[:, column], y_off[:, column], fwd_bound[:, column], dtype, f"{what} forward"
        )
        _assert_close(dx_on[:, column], dx_off[:, column], bwd_bound[:, column], dtype, what)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((33, 4), (0,)),
        ((40, 15, 3), (1,)),
        ((3, 5, 20), (0, 2)),
        ((4, 5, 20), (0, 2)),
        ((8, 129), (0,)),
        ((2, 8, 1024), (1,)),
    ],
)
def test_column_kernel_needs_contiguous_axes_and_16_to_128_entries_after(shape, axes):
    # Fewer than 16 entries after the block would leave most lanes idle, more than 128 make the
    # strided walk slower than the XLA path; axes that are not one block have no
    # [outer, n, inner] view without a transpose: all stay on the XLA path.
    assert not _kernel.eligible(jnp.zeros(shape, jnp.float32), axes, None)
    assert _kernel.eligible(jnp.zeros((8, 128), jnp.float32), (0,), None)


def test_edge_rows_follow_the_row_rules(monkeypatch):
    # The rules themselves, on the kernel's output (the comparison above would pass if both
    # paths broke the same way).
    monkeypatch.setenv(ENV, "on")
    x, row_names = _edge_logits("float32")
    rows = dict(zip(row_names, range(len(row_names)), strict=True))
    probs = _np(jsoftmax.softmax(x))
    log_probs = _np(jsoftmax.log_softmax(x))
    for key in ("nan", "nan_and_inf"):
        assert np.isnan(probs[rows[key]]).all() and np.isnan(log_probs[rows[key]]).all(), key
    np.testing.assert_array_equal(probs[rows["all_minus_inf"]], 0.0)
    np.testing.assert_array_equal(log_probs[rows["all_minus_inf"]], -np.inf)
    for key, k in (("one_plus_inf", 1), ("three_plus_inf", 3), ("plus_and_minus_inf", 18)):
        hit = np.asarray(x[rows[key]]) == np.inf
        assert hit.sum() == k, key
        np.testing.assert_array_equal(probs[rows[key]], np.where(hit, np.float32(1 / k), 0), key)
        expected_log = np.where(hit, -np.log(np.float32(k)), -np.inf).astype(np.float32)
        np.testing.assert_allclose(log_probs[rows[key]], expected_log, rtol=1e-7, err_msg=key)
    for key in ("huge", "huge_and_small", "equal_large", "one_finite"):
        assert np.all(np.isfinite(probs[rows[key]])), key
        np.testing.assert_allclose(probs[rows[key]].sum(), 1.0, rtol=1e-6, err_msg=key)


# --------------------------------------------------------------------------------------------
# 2. accuracy against float64


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("n", [17, 1000, 4099])
def test_float32_accuracy(monkeypatch, name, n):
    """Per entry: the rounding of ``x - max`` in float32 (half an ulp of it, absolute, which is a
    relative error of exp(x - max)) is inherent to any float32 implementation that shifts by the
    maximum (up to ~4e-6 for entries above 1e-30, where |x - max| < 69); on top of it a few
    roundings (exp polynomial, sum, reciprocal, product) of a few eps each."""
    monkeypatch.setenv(ENV, "on")
    x = _logits((8, n), seed=4, scale=8.0)
    hlo = jax.jit(lambda x: FUNCTIONS[name](x)).lower(x).as_text()
    assert _targets(hlo) == {f"jsoftmax_{name}_fwd"}
    out = to_f64(FUNCTIONS[name](x))
    exact = REFERENCES[name](x)
    x64 = to_f64(x)
    shifted = np.abs(x64 - x64.max(axis=-1, keepdims=True)).astype(np.float32)
    half_ulp_shift = 0.5 * np.spacing(shifted).astype(np.float64)
    if name == "softmax":
        considered = exact > 1e-30  # below, float32's flush of subnormal exps dominates
        rel = np.abs(out - exact) / exact
        allowed = half_ulp_shift + 8 * EPS32
        bad = considered & (rel > allowed)
        assert not bad.any(), f"max relative error {rel[considered].max():.3g}"
        assert np.all(np.abs(out - exact) <= 1e-30 + allowed * exact)
    else:
        big_l = -exact.max(axis=-1, keepdims=True)
        allowed = half_ulp_shift + 8 * EPS32 * (np.maximum(1.0, big_l) + np.abs(exact))
        err = np.abs(out - exact)
        assert np.all(err <= allowed), f"max error {err.max():.3g} (bound {allowed.min():.3g})"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_is_rounded_once(monkeypatch, name, dtype):
    # The float64 result at the (already rounded) input, rounded once to the dtype: the kernel
    # computes in float32, so it may differ from that only where the float32 result lies within
    # float32 rounding of a rounding boundary of the dtype (then by 1 ulp).
    monkeypatch.setenv(ENV, "on")
    x = _logits((16, 333), dtype, seed=5)
    assert _targets(jax.jit(lambda x: FUNCTIONS[name](x)).lower(x).as_text()) == {
        f"jsoftmax_{name}_fwd"
    }
    out = _np(FUNCTIONS[name](x))
    rounded = REFERENCES[name](x).astype(out.dtype)
    distance = _ulp_distance(out, rounded)
    assert distance.max() <= 1, f"{int(distance.max())} ulps from the correctly rounded result"
    exact_share = np.mean(distance == 0)
    assert exact_share >= 0.99, f"only {exact_share:.2%} of entries correctly rounded"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_float32_backward_accuracy(monkeypatch, name):
    # The kernel's vjp against the float64 vjp at the float64 output, with the same per-term
    # bound as the comparison of the two paths.
    monkeypatch.setenv(ENV, "on")
    x = _logits((6, 1000), seed=6)
    g = _logits((6, 1000), seed=7, scale=1.0)
    _, pullback = jax.vjp(lambda x: FUNCTIONS[name](x), x)
    dx = to_f64(pullback(g)[0])
    exact_y = REFERENCES[name](x)
    g64 = to_f64(g)
    exact = _exact_vjp(name, exact_y, g64, -1)
    bound = _backward_bound(name, exact_y, g64, -1)
    err = np.abs(dx - exact)
    assert np.all(err <= bound), f"max error {err.max():.3g}, worst ratio {np.max(err / bound):.3g}"


def _exact_vjp(name, y64, g64, axis):
    """The float64 VJP at the float64 output ``y64`` (finite inputs)."""
    if name == "softmax":
        return y64 * (g64 - np.sum(g64 * y64, axis=axis, keepdims=True))
    return g64 - np.exp(y64) * np.sum(g64, axis=axis, keepdims=True)


# Long reductions (issue 14). With a fixed number of float32 partial sums (64 per row, 4 per lane
# of a column) the error grew linearly with the length: at 2^24, 4e-4 against the XLA path's
# 6e-8. The kernels now sum blocks of 16 terms per float32 partial sum and the block sums in
# float64. Each case runs both paths on the same input, forward and VJP.
LONG_REDUCTIONS = [
    ((1, 2**24), -1, "float32"),
    ((2048, 2048), None, "float32"),  # axis=None: one 4M-long row
    ((1, 2**22 + 3), -1, "bfloat16"),  # odd: a partial vector at the end
    ((1, 2**22 + 3), -1, "float16"),
    ((1, 2**20, 16), 1, "float32"),  # column kernel: 16 slices of 2^20
    ((1, 2**18, 16), 1, "bfloat16"),  # (the XLA path is slow on 16-bit columns)
    ((1, 2**18, 16), 1, "float16"),
]


def _misrounded_share(out, exact64):
    """Share of entries of a bf16/f16 result that differ from the correctly rounded float64 one."""
    return float(np.mean(_ulp_distance(out, exact64.astype(out.dtype)) != 0))


@pytest.mark.parametrize(("shape", "axis", "dtype"), LONG_REDUCTIONS)
def test_long_reduction_accuracy(monkeypatch, shape, axis, dtype):
    """Max relative error against float64 (max |error| / max |exact|) within 2x of the XLA path's,
    forward and VJP. An error below half a float32 ulp counts as half an ulp (the resolution of
    a float32 result: the comparison is not between two roundings of the same value). For
    bf16 / f16 both errors are the storage dtype's rounding, so the share of entries not rounded
    correctly is compared too: within 2x of the XLA path's, plus 1e-4."""
    x = _logits(shape, dtype, seed=51)
    g = _logits(shape, dtype, seed=52, scale=1.0)
    x64, g64 = to_f64(x), to_f64(g)
    suffix = "_columns" if len(shape) == 3 else ""
    floor = EPS32 / 2
    for name in sorted(FUNCTIONS):
        exact_y = REFERENCES[name](x64, axis=axis)
        exact_dx = _exact_vjp(name, exact_y, g64, axis)
        errors, shares = {}, {}
        for mode in ("on", "off"):
            y, dx, hlo = _value_and_vjp(monkeypatch, mode, name, x, g, axis)
            backward = reverse_kernel(name, dtype, suffix=suffix)
            expected = {f"jsoftmax_{name}_fwd{suffix}", backward}
            assert _targets(hlo) == (expected if mode == "on" else set()), _targets(hlo)
            # Both backward kernels, whichever reverse mode ran above: from the input (a float32
            # gradient whose output is dead) and from the output (the run above, the torch side).
            dx_from_x = dx_from_y = dx
            if mode == "on":
                dx_from_x, dx_from_y = _both_backward_kernels(monkeypatch, name, x, y, g, axis)
            pairs = ((y, exact_y), (dx_from_x, exact_dx), (dx_from_y, exact_dx))
            errors[mode] = tuple(relative_error(a, b) for a, b in pairs)
            if dtype in LOW_PRECISION:
                shares[mode] = tuple(_misrounded_share(a, b) for a, b in pairs)
        passes = ("forward", "vjp from x", "vjp from y")
        for which, kernel, xla in zip(passes, errors["on"], errors["off"], strict=True):
            assert kernel <= 2 * max(xla, floor), (
                f"{name} {which}: kernel error {kernel:.3g}, XLA path {xla:.3g}"
            )
        if dtype not in LOW_PRECISION:
            continue
        for which, kernel, xla in zip(passes, shares["on"], shares["off"], strict=True):
            assert kernel <= 2 * xla + 1e-4, (
                f"{name} {which}: {kernel:.2e} of the kernel's entries misrounded, "
                f"XLA path {xla:.2e}"
            )


# --------------------------------------------------------------------------------------------
# 3. when the XLA path is kept, and when the kernels are lowered


def _compiled_targets(fn, *args, **kwargs) -> set[str]:
    return _targets(jax.jit(fn).lower(*args, **kwargs).compile().as_text())


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_float64_uses_xla_path(monkeypatch, name):
    monkeypatch.setenv(ENV, "on")
    with enable_x64():
        x = _logits((4, 33), "float64")
        assert x.dtype == jnp.float64
        assert not _kernel.eligible(x, (1,), None)
        fn = FUNCTIONS[name]
        assert not _compiled_targets(jax.grad(lambda x: jnp.sum(fn(x)[:, 0])), x)
        np.testing.assert_allclose(_np(fn(x)), REFERENCES[name](x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_non_trailing_axis_uses_xla_path(monkeypatch, name):
    monkeypatch.setenv(ENV, "on")
    x = _logits((33, 4))
    fn = FUNCTIONS[name]
    assert not _kernel.eligible(x, (0,), None)
    assert not _compiled_targets(jax.grad(lambda x: jnp.sum(fn(x, axis=0)[0])), x)
    # The same 2-D input over its trailing axis does use the kernels (the check above can fail).
    # (The gradient needs no output: one kernel from the input.)
    targets = _compiled_targets(jax.grad(lambda x: jnp.sum(fn(x, axis=1)[0])), x)
    assert targets == {f"jsoftmax_{name}_bwd_from_input"}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_where_runs_the_kernels_after_masking(monkeypatch, name):
    # Masked calls set the masked entries to -inf (XLA) and run the forward kernel; the backward
    # rules do not depend on the mask (a masked entry's output is 0 / -inf like an unmasked
    # -inf's), so the backward kernel is used too.
    fn = FUNCTIONS[name]
    x = _logits((6, 37), seed=8)
    mask = np.random.default_rng(9).random((6, 37)) > 0.3
    mask[2] = False  # a fully masked row
    weights = _logits((6, 37), seed=10, scale=1.0)
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)

        def loss(x):
            out = fn(x, where=mask)
            return jnp.sum(jnp.where(jnp.isfinite(out), out, 0) * weights)

        lowered = jax.jit(jax.value_and_grad(loss)).lower(x)
        results[mode] = (_targets(lowered.as_text()), *map(_np, lowered.compile()(x)))
    assert results["on"][0] == {f"jsoftmax_{name}_fwd", f"jsoftmax_{name}_bwd"}, results["on"][0]
    assert results["off"][0] == set()
    np.testing.assert_allclose(results["on"][1], results["off"][1], rtol=1e-6)
    bound = _backward_bound(name, _np(fn(x, where=mask)), weights, -1)
    _assert_close(results["on"][2], results["off"][2], bound, "float32", f"masked {name} grad")
    np.testing.assert_array_equal(results["on"][2][2], 0.0)


def test_axis_name_is_not_eligible(monkeypatch):
    monkeypatch.setenv(ENV, "on")
    x = _logits((4, 16))
    assert _kernel.eligible(x, (1,), None)  # the same call without axis_name is
    assert not _kernel.eligible(x, (1,), "x")
    assert not _kernel.eligible(x, (1,), ("x", "y"))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
def test_empty_arrays_use_xla_path(monkeypatch, shape):
    monkeypatch.setenv(ENV, "on")
    x = jnp.zeros(shape, jnp.float32)
    assert not _kernel.eligible(x, (len(shape) - 1,), None)
    for name, fn in FUNCTIONS.items():
        assert not _compiled_targets(jax.grad(lambda x, fn=fn: jnp.sum(fn(x))), x), name
        assert fn(x).shape == shape


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mode_off_is_not_eligible(monkeypatch, dtype):
    x = _logits((4, 16), dtype)
    monkeypatch.setenv(ENV, "off")
    assert not _kernel.eligible(x, (1,), None)
    monkeypatch.setenv(ENV, "on")
    assert _kernel.eligible(x, (1,), None)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_lowering_for_cuda_has_no_cpu_kernel(monkeypatch, name):
    monkeypatch.setenv(ENV, "on")
    fn = FUNCTIONS[name]
    x = _logits((4, 17))
    jitted = jax.jit(jax.value_and_grad(lambda x: jnp.sum(fn(x)[:, 0])))
    cuda = jitted.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    cpu = jitted.trace(x).lower(lowering_platforms=("cpu",)).compile().as_text()
    assert not _targets(cuda), f"CUDA lowering calls the CPU kernels: {_targets(cuda)}"
    assert _targets(cpu) == {f"jsoftmax_{name}_fwd", f"jsoftmax_{name}_bwd"}


# --------------------------------------------------------------------------------------------
# 4. transformations around the kernels


def _in_both_modes(monkeypatch, name, make_fn, *args, required=("fwd", "bwd")):
    """Outputs (numpy) of ``make_fn()`` jitted afresh with mode on and with mode off; checks that
    "on" compiled the ``required`` kernels of ``name`` (and at most the other backward kernel
    besides) and "off" none."""
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)
        compiled = jax.jit(make_fn()).lower(*args).compile()
        outputs = jax.tree_util.tree_map(_np, compiled(*args))
        results[mode] = (compiled.as_text(), outputs)
    optional = ("fwd", "bwd", "bwd_from_input")
    _assert_switched(name, results["on"][0], results["off"][0], required, optional=optional)
    return results["on"][1], results["off"][1]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("in_axis", [0, 1])
def test_vmap(monkeypatch, name, in_axis):
    fn = FUNCTIONS[name]
    x = _logits((5, 6, 19), seed=11)
    g = _logits((5, 6, 19), seed=12, scale=1.0)

    def make():
        def value_and_vjp(x, g):
            y, pullback = jax.vjp(fn, x)
            return y, pullback(g)[0]

        return jax.vmap(value_and_vjp, in_axes=(in_axis, in_axis))

    (y_on, dx_on), (y_off, dx_off) = _in_both_modes(monkeypatch, name, make, x, g)
    moved_x, moved_g = np.moveaxis(_np(x), in_axis, 0), np.moveaxis(_np(g), in_axis, 0)
    np.testing.assert_allclose(y_off, REFERENCES[name](moved_x), rtol=1e-5, atol=1e-6)
    _assert_close(y_on, y_off, _forward_bound(name, y_off, -1), "float32", "vmap forward")
    bound = _backward_bound(name, y_off, moved_g, -1)
    _assert_close(dx_on, dx_off, bound, "float32", "vmap vjp")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_grad_and_grad_of_grad(monkeypatch, name):
    fn = FUNCTIONS[name]
    x = _logits((3, 21), seed=13)
    w = _logits((3, 21), seed=14, scale=1.0)
    v = _logits((3, 21), seed=15, scale=1.0)

    def make():
        def loss(x):
            return jnp.sum(w * fn(x))

        def inner(x):
            return jnp.sum(v * jax.grad(loss)(x))

        return lambda x: (jax.grad(loss)(x), jax.grad(inner)(x))

    (grad_on, hess_on), (grad_off, hess_off) = _in_both_modes(monkeypatch, name, make, x)
    np.testing.assert_allclose(grad_on, grad_off, rtol=1e-5, atol=1e-6)
    # Second derivatives of these shift-invariant functions sum to 0 along each row: terms of
    # order 1 cancel, so the two paths differ by a few float32 ulps of those terms.
    np.testing.assert_allclose(hess_on, hess_off, rtol=1e-5, atol=1e-5)


# XLA's CPU backend in jaxlib 0.10.2 miscompiles some reductions it hands to YNNPACK (upstream:
# jax-ml/jax#39103, wrong results for a vmapped product followed by a reduction). The smallest
# case found here is softmax's backward formula summed over a batch of cotangents, which is what
# jacrev(jacrev(...)) compiles to; eager evaluation (op by op) is right.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def _xla_reduce_fusion_miscompiles() -> bool:
    rng = np.random.default_rng(0)
    c = rng.standard_normal((14, 7)).astype(np.float32)
    r = rng.standard_normal((1000, 14, 7)).astype(np.float32)

    def f(r, c):
        return jnp.sum(r - c * jnp.sum(c * r, axis=-1, keepdims=True), axis=1)

    exact = np.sum(r - c * np.sum(c * r, axis=-1, keepdims=True), axis=1)
    return not np.allclose(np.asarray(jax.jit(f)(r, c)), exact, rtol=1e-4, atol=1e-4)


HESSIAN_PROBE = """
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    import jsoftmax
    x = (np.random.default_rng(16).standard_normal((2, 7)) * 3).astype(np.float32)
    out = {}
    for name in ("softmax", "log_softmax"):
        for mode in ("on", "off"):
            os.environ["JSOFTMAX_CPU_KERNEL"] = mode
            fn = lambda a: getattr(jsoftmax, name)(a)
            out[f"{name}_{mode}"] = np.asarray(jax.jit(jax.jacrev(jax.jacrev(fn)))(x)).tolist()
        with jax.enable_x64(True):
            exact = jax.jacrev(jax.jacrev(getattr(jax.nn, name)))(jnp.asarray(x, jnp.float64))
            out[f"{name}_exact"] = np.asarray(exact).tolist()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_jacrev_of_jacrev(monkeypatch, name):
    fn = FUNCTIONS[name]
    x = _logits((2, 7), seed=16)
    # The outer derivative of the tangent map is the formula's, from x: no kernel need remain
    # (the inner backward kernel's own result is unused).
    make = lambda: jax.jacrev(jax.jacrev(fn))  # noqa: E731
    on, off = _in_both_modes(monkeypatch, name, make, x, required=())
    assert on.shape == (2, 7) * 3
    with enable_x64():
        x64 = jnp.asarray(x, jnp.float64)
        exact = np.asarray(jax.jacrev(jax.jacrev(REFERENCE_JAX[name]))(x64))
    if _xla_reduce_fusion_miscompiles():
        # Both paths go through XLA's bug here: the same check in a process with that fusion
        # off (the probe above detects the bug; the subprocess shows the rules are right).
        env = _subprocess_env(XLA_FLAGS=_YNN_FLAG)
        probe = _run_probe(HESSIAN_PROBE, env)  # the same x (the exact results are compared)
        on, off = np.array(probe[f"{name}_on"]), np.array(probe[f"{name}_off"])
        np.testing.assert_allclose(np.array(probe[f"{name}_exact"]), exact, rtol=1e-12)
    # Shift invariance: cancelling terms of order 1 (see test_grad_and_grad_of_grad).
    np.testing.assert_allclose(on, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(off, exact, rtol=1e-5, atol=1e-5)


def test_reduce_fusion_probe_detects_a_miscompile():
    # The probe above can fail: with XLA's YNNPACK reduce fusion off, it finds nothing.
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_cpu_kernel as t; "
    code += "print(t._xla_reduce_fusion_miscompiles())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
        env=_subprocess_env(XLA_FLAGS=_YNN_FLAG),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_checkpoint(monkeypatch, name):
    fn = FUNCTIONS[name]
    x = _logits((4, 40), seed=17)
    w = _logits((4, 40), seed=18, scale=1.0)

    def make():
        # A fresh function to checkpoint: jax.checkpoint caches its trace by the function object,
        # so checkpointing jsoftmax.softmax itself would reuse the first mode's trace.
        return jax.value_and_grad(lambda x: jnp.sum(w * jax.checkpoint(lambda x: fn(x))(x)))

    # The loss needs the forward kernel; the rematerialised call in the backward pass has a dead
    # output, so it becomes the one kernel from the input.
    required = ("fwd", "bwd_from_input")
    results = _in_both_modes(monkeypatch, name, make, x, required=required)
    (loss_on, grad_on), (loss_off, grad_off) = results
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    y = REFERENCES[name](x)
    _assert_close(grad_on, grad_off, _backward_bound(name, y, w, -1), "float32", "checkpoint")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_scan(monkeypatch, name):
    fn = FUNCTIONS[name]
    x = _logits((5, 3, 29), seed=19)
    w = _logits((5, 3, 29), seed=20, scale=1.0)

    def make():
        def loss(x):
            def step(carry, xs):
                row, weight = xs
                out = fn(row)
                return carry + jnp.sum(weight * out), out

            total, outs = lax.scan(step, jnp.float32(0), (x, w))
            return total, outs

        return jax.value_and_grad(loss, has_aux=True)

    ((loss_on, outs_on), grad_on), ((loss_off, outs_off), grad_off) = _in_both_modes(
        monkeypatch, name, make, x
    )
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    _assert_close(outs_on, outs_off, _forward_bound(name, outs_off, -1), "float32", "scan outputs")
    y = REFERENCES[name](x)
    _assert_close(grad_on, grad_off, _backward_bound(name, y, w, -1), "float32", "scan grad")


# --------------------------------------------------------------------------------------------
# 5. auto mode


def test_auto_with_several_devices_uses_xla_path(monkeypatch):
    if len(jax.devices("cpu")) == 1:
        pytest.skip("needs the conftest's simulated devices")
    monkeypatch.setenv(ENV, "auto")
    x = _logits((4, 17))
    for name, fn in FUNCTIONS.items():
        assert not _compiled_targets(jax.grad(lambda x, fn=fn: jnp.sum(fn(x)[:, 0])), x), name
    assert jsoftmax.cpu_kernel_info()["single_cpu_device"] is False
    # The same call with "on" does lower the kernels (so the check above can fail).
    monkeypatch.setenv(ENV, "on")
    assert _compiled_targets(lambda x: jsoftmax.softmax(x), x) == {"jsoftmax_softmax_fwd"}


def _subprocess_env(**overrides: str) -> dict[str, str]:
    """This environment with one CPU device (no simulated-device flag) and ``overrides``."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env.update(overrides)
    return env


def _run_probe(script: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PROBE = """
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    import jsoftmax

    def targets(fn, x):
        text = jax.jit(fn).lower(x).compile().as_text()
        return sorted(set(re.findall(r'custom_call_target="(jsoftmax_\\w+)"', text)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 3)
    x64 = np.asarray(x, np.float64)
    exact = np.exp(x64 - x64.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    print(json.dumps({
        "devices": len(jax.devices()),
        "info": jsoftmax.cpu_kernel_info(),
        "targets": targets(jax.grad(lambda x: jnp.sum(jsoftmax.softmax(x)[:, 0])), x),
        "log_targets": targets(lambda x: jsoftmax.log_softmax(x), x),
        "softmax_error": float(np.max(np.abs(np.asarray(jsoftmax.softmax(x), np.float64) - exact))),
    }))
"""


def test_auto_with_one_device_uses_kernel():
    # The subprocess loads the same installed library as this process.
    here = jsoftmax.cpu_kernel_info()
    assert here["available"], here["error"]
    out = _run_probe(PROBE, _subprocess_env(**{ENV: "auto"}))
    assert out["devices"] == 1
    info = out["info"]
    assert info["mode"] == "auto" and info["single_cpu_device"] is True, info
    assert info["available"] is True and info["error"] is None, info
    assert info["library"] == here["library"], "the subprocess built a second library"
    # A gradient alone needs no output: the backward kernel from the input is all that remains.
    assert out["targets"] == ["jsoftmax_softmax_bwd_from_input"]
    assert out["log_targets"] == ["jsoftmax_log_softmax_fwd"]
    assert out["softmax_error"] < 1e-6


# --------------------------------------------------------------------------------------------
# 6. instruction-set variants, damaged libraries


# What each variant is checked with: the comparisons with the XLA path (rows, columns, edge
# values, every dtype) and the accuracy bounds, run by pytest in a fresh process.
VARIANT_SELECTION = (
    "matches_xla_path or edge or accuracy or rounded_once or test_isa_in_use_is_the_one_asked_for"
)


def test_isa_in_use_is_the_one_asked_for():
    info = jsoftmax.cpu_kernel_info()
    assert info["available"] is True, info["error"]
    assert info["cpu_isa"] in _kernel.ISAS and info["isa"] in _kernel.ISAS
    assert info["isa"] == (os.environ.get(_kernel.ISA_ENV) or info["cpu_isa"]), info
    assert os.path.basename(info["library"]).startswith(f"libjsoftmax_{info['isa']}."), info


@pytest.mark.parametrize("isa", _kernel.ISAS)
def test_isa_variant_agrees_with_xla_path(isa):
    # This process runs the best variant the CPU supports; each variant is forced in a fresh
    # pytest process (the variable is read at import). Variants above this CPU's are refused.
    info = jsoftmax.cpu_kernel_info()
    best = info["cpu_isa"]
    if isa == info["isa"]:  # this process: the whole module runs it
        assert isa == os.environ.get(_kernel.ISA_ENV, best), info
        return
    env = {**os.environ, _kernel.ISA_ENV: isa}
    if _kernel.ISAS.index(isa) > _kernel.ISAS.index(best):
        out = _run_probe(ISA_ERROR_PROBE, env)
        assert out["error"] == "ValueError", out
        assert _kernel.ISA_ENV in out["message"] and "up to" in out["message"], out
        return
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(
        [*command, "-k", VARIANT_SELECTION],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert summary and " passed" in summary[0] and "skipped" not in summary[0], summary


ISA_ERROR_PROBE = """
    import json
    import jax.numpy as jnp
    import jsoftmax
    try:
        jsoftmax.softmax(jnp.ones((2, 16)))
        print(json.dumps({"error": None, "message": ""}))
    except Exception as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


@pytest.mark.parametrize("value", ["avx1024", "native", "sse"])
def test_bad_isa_value_is_a_value_error(value):
    out = _run_probe(ISA_ERROR_PROBE, _subprocess_env(**{ENV: "on", _kernel.ISA_ENV: value}))
    assert out["error"] == "ValueError", out
    assert _kernel.ISA_ENV in out["message"] and "expected one of" in out["message"], out


def _installed_build(tmp_path):
    """A copy of this installation's manifest and libraries in ``tmp_path``."""
    source = os.path.dirname(jsoftmax.cpu_kernel_info()["library"])
    copy = tmp_path / "_cpu"
    copy.mkdir()
    for name in os.listdir(source):
        if name.endswith((".so", ".json")):
            (copy / name).write_bytes(open(os.path.join(source, name), "rb").read())
    return copy, json.loads((copy / "manifest.json").read_text())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_damaged_library_is_refused_before_loading(tmp_path, damage):
    # A truncated library mapped by the dynamic loader can kill the process with SIGBUS: the
    # manifest's size and digest are checked before anything is loaded.
    directory, manifest = _installed_build(tmp_path)
    isa = jsoftmax.cpu_kernel_info()["isa"]
    library = directory / manifest["libraries"][isa]["file"]
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[:100_000])
        match = "does not match its build manifest"
    elif damage == "corrupt":  # same size, one byte changed
        library.write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])
        match = "does not match its build manifest"
    else:
        library.unlink()
        match = "cannot read"
    with pytest.raises(RuntimeError, match=match):
        _kernel._open_verified(directory, manifest, isa)
    # The undamaged copy of the same file loads (the check above can pass).
    intact = tmp_path / "intact"
    intact.mkdir()
    (intact / library.name).write_bytes(data)
    assert _kernel._open_verified(intact, manifest, isa).jsoftmax_isa() == isa.encode()


def test_stale_source_is_refused(tmp_path, monkeypatch):
    # An editable install whose kernels.cc changed after the build would run the old code.
    (tmp_path / "_cpu").mkdir()
    (tmp_path / "_cpu" / "kernels.cc").write_text("// edited\n")
    monkeypatch.setattr(_kernel, "_package_dirs", lambda: [tmp_path])
    with pytest.raises(RuntimeError, match="changed since the kernels were built"):
        _kernel._check_source({"source_sha256": "0" * 64})
    digest = __import__("hashlib").sha256(b"// edited\n").hexdigest()
    _kernel._check_source({"source_sha256": digest})  # the matching source passes


def test_unavailable_kernels_warn_once_and_use_xla_path(monkeypatch):
    monkeypatch.setenv(ENV, "on")
    monkeypatch.setitem(_kernel._state, "error", "RuntimeError: no library (test)")
    monkeypatch.setitem(_kernel._state, "warned", False)
    x = _logits((4, 16))
    with pytest.warns(RuntimeWarning, match=r"XLA path.*no library \(test\)") as caught:
        assert not _kernel.eligible(x, (1,), None)
        assert not _kernel.eligible(x, (1,), None)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    info = jsoftmax.cpu_kernel_info()
    assert info["available"] is False and info["error"] == "RuntimeError: no library (test)"


def test_registration_happens_at_import_not_in_a_trace():
    # The handlers are registered when jsoftmax is imported: lowering needs no load step, and the
    # module has no compiler, cache or build code left to call.
    assert _kernel._state["isa"] is not None
    for name in ("_build", "_compiler", "_cache_dir", "SOURCE"):
        assert not hasattr(_kernel, name), name
    assert "subprocess" not in vars(_kernel)


# --------------------------------------------------------------------------------------------
# 7-8. the mode variable and cpu_kernel_info


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("value", ["maybe", "1", "yes"])
def test_bad_mode_value_is_a_value_error(monkeypatch, name, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match="JSOFTMAX_CPU_KERNEL"):
        FUNCTIONS[name](jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="JSOFTMAX_CPU_KERNEL"):
        jsoftmax.cpu_kernel_info()


def test_cpu_kernel_info_in_this_process():
    info = jsoftmax.cpu_kernel_info()
    assert set(info) == {
        "mode", "available", "isa", "cpu_isa", "library", "error", "single_cpu_device"
    }  # fmt: skip
    assert info["mode"] == "on", "the root conftest.py sets JSOFTMAX_CPU_KERNEL=on"
    assert info["available"] is True and info["error"] is None, info["error"]
    assert info["library"] and os.path.isfile(info["library"]), info["library"]
    assert info["isa"] in _kernel.ISAS and info["cpu_isa"] in _kernel.ISAS
    assert info["single_cpu_device"] is (len(jax.devices("cpu")) == 1)


_AFFINITY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import jax, jax.numpy as jnp, numpy as np
    import jsoftmax

    def masks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                out[tid] = sorted(os.sched_getaffinity(int(tid)))
            except OSError:  # a thread that ended in between
                pass
        return out

    allowed = sorted(os.sched_getaffinity(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(512, 4096)), jnp.float32)
    fns = [jax.jit(jsoftmax.softmax), jax.jit(jsoftmax.log_softmax)]
    before = masks()
    for i in range(300):
        time.sleep(0.001 * (i % 3))  # idle gaps: the pool thread's wake-up lands on either CPU
        fns[i % 2](x).block_until_ready()
    time.sleep(0.2)  # a task that starts after its call returned takes no rows but may still move
    after = masks()
    print(json.dumps({"allowed": allowed, "before": before, "after": after}))
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="the helper threads move between CPUs only on Linux with two or more CPUs allowed",
)
@pytest.mark.parametrize("spread", ["1", "0"])
def test_kernel_threads_keep_their_cpu_affinity(spread):
    # A helper task of the kernels that finds itself on the calling thread's CPU narrows its own
    # affinity for the length of its share (parallel_rows in kernels.cc); every thread of the
    # process must have its mask back after the calls, with JSOFTMAX_CPU_SPREAD on and off.
    env = dict(os.environ, JSOFTMAX_CPU_KERNEL="on", JSOFTMAX_CPU_SPREAD=spread)
    command = [sys.executable, "-c", _AFFINITY_SCRIPT]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    allowed = report["allowed"]
    assert report["before"] and report["after"]
    changed = {tid: mask for tid, mask in report["after"].items() if mask != allowed}
    assert not changed, f"threads left with another CPU mask than {allowed}: {changed}"


# Issue: with JSOFTMAX_CPU_KERNEL=on, an Explicit mesh with a sharded reduced axis crashed in the
# kernel's reshape (ShardingTypeError); leading axes may be sharded and keep the kernels.
EXPLICIT_SHARDING_CASES = [
    (("a", None, "b"), (1, 2), False),  # reduced axes sharded: the XLA path
    (("a", None, "b"), (2,), False),
    (("a", "b", None), (2,), True),  # leading axes sharded: the kernels, shard by shard
    (("a", None, None), (1, 2), True),
    (("a", None, "b"), (1,), True),  # one axis after the block, sharded: no merge needed
]


@pytest.mark.parametrize(("spec", "axis", "kernel"), EXPLICIT_SHARDING_CASES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_explicit_mesh_with_sharded_axes(monkeypatch, name, spec, axis, kernel):
    if len(jax.devices("cpu")) < 8:
        pytest.fail("needs the root conftest's 8 simulated devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.setenv(ENV, "on")
    fn = FUNCTIONS[name]
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x = _logits((8, 12, 64), seed=41)
    g = _logits((8, 12, 64), seed=42, scale=1.0)
    xs = jax.device_put(x, NamedSharding(mesh, P(*spec)))

    def value_and_vjp(x):
        y, pullback = jax.vjp(lambda x: fn(x, axis=axis), x)
        return y, pullback(g.astype(y.dtype))[0]

    with jax.set_mesh(mesh):
        compiled = jax.jit(value_and_vjp).lower(xs).compile()
        y, dx = compiled(xs)
    suffix = "_columns" if axis == (1,) else ""
    backward = f"jsoftmax_{name}_bwd{suffix}"
    expected = {f"jsoftmax_{name}_fwd{suffix}", backward} if kernel else set()
    # After SPMD partitioning XLA keeps the conditional on the saved scalar (it then picks the
    # backward kernel from the output at run time): the other one may remain in the text.
    other = {f"jsoftmax_{name}_bwd_from_input{suffix}"} if kernel else set()
    assert expected <= _targets(compiled.as_text()) <= expected | other
    assert y.sharding.spec == P(*spec)
    y_ref = REFERENCES[name](x, axis=axis)
    np.testing.assert_allclose(_np(y), y_ref, rtol=2e-6, atol=1e-6)
    monkeypatch.setenv(ENV, "off")
    _, dx_off = jax.jit(value_and_vjp)(x)
    np.testing.assert_allclose(_np(dx), _np(dx_off), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 9. torch interop


@pytest.mark.parametrize("log", [False, True])
def test_torch_interop_modes_agree(monkeypatch, log):
    torch = pytest.importorskip("torch")
    from jsoftmax import interop
    from jsoftmax.interop import _ops

    fn = interop.log_softmax if log else interop.softmax
    name = "log_softmax" if log else "softmax"
    values = np.random.default_rng(21).standard_normal((4, 19)).astype(np.float32) * 3
    values[1] = -np.inf
    values[2, [4, 11]] = np.inf
    values[3, ::3] = -np.inf
    cotangent = torch.tensor(
        np.random.default_rng(22).standard_normal((4, 19)), dtype=torch.float32
    )
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)
        x = torch.tensor(values, requires_grad=True)
        out = fn(x, dim=1)
        (grad,) = torch.autograd.grad(out, x, cotangent)
        # The interop's jitted JAX functions, lowered as the calls above ran them.
        forward = _ops._jax_forward.lower(
            jnp.asarray(values), shape=values.shape, axis=1, log=log, kernel_mode=mode
        )
        backward = _ops._jax_backward.lower(
            jnp.asarray(cotangent.numpy()), jnp.asarray(out.detach().numpy()), 1, log, mode
        )
        results[mode] = (out.detach().numpy(), grad.numpy(), forward.as_text() + backward.as_text())
    _assert_switched(name, results["on"][2], results["off"][2], passes=("fwd", "bwd"))
    y_on, dx_on, _ = results["on"]
    y_off, dx_off, _ = results["off"]
    _assert_close(y_on, y_off, _forward_bound(name, y_off, -1), "float32", f"interop {name}")
    bound = _backward_bound(name, y_off, cotangent.numpy(), -1)
    _assert_close(dx_on, dx_off, bound, "float32", f"interop {name} grad")
    np.testing.assert_array_equal(y_on[1], 0.0 if not log else -np.inf)
    np.testing.assert_array_equal(dx_on[1], 0.0)
    hit = np.isinf(values[2])
    expected = np.where(hit, -np.log(2.0), -np.inf) if log else np.where(hit, 0.5, 0.0)
    np.testing.assert_allclose(y_on[2], expected, rtol=1e-7)
