"""cross_entropy's CPU kernels (integer labels, classes along the last axis, label smoothing only
without class weights) against the XLA path, the float64 definition and the rules around them.

As in test_cpu_kernel.py, most tests compute one thing with ``JSOFTMAX_CPU_KERNEL=on`` and
``=off`` (every function jitted afresh) and check, in the lowered StableHLO, that "on" called the
two kernels (``jsoftmax_cross_entropy_stats`` forward, ``jsoftmax_cross_entropy_bwd`` backward)
and "off" neither. Both paths compute in float32 and round a bf16/f16 gradient once, so float32
results agree to a few ulps and 16-bit ones to one ulp of the storage dtype.
"""

from __future__ import annotations

import contextlib
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import enable_x64, ref_cross_entropy, relative_error, to_f64
from jax.test_util import check_grads

import jsoftmax

ENV = "JSOFTMAX_CPU_KERNEL"
TARGETS = {"jsoftmax_cross_entropy_stats", "jsoftmax_cross_entropy_bwd"}
EPS32 = float(np.finfo(np.float32).eps)
# Relative agreement of the two paths per dtype: float32 a few ulps; 16-bit one ulp of storage.
RTOL = {"float32": 32 * EPS32, "bfloat16": 2.0**-7, "float16": 2.0**-10}
# float16 subnormals: XLA's conversion misrounds them by up to 2 steps of 2^-24 (the kernel's are
# correctly rounded: 3.5167e-5 for an exact 3.5180e-5, XLA's path 3.5048e-5).
ATOL = {"float32": 1e-12, "bfloat16": 1e-30, "float16": 2.0**-23}


def _targets(text: str) -> set[str]:
    return set(re.findall(r"custom_call @(jsoftmax_\w+)", text))


def _logits(shape, dtype="float32", seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _loss_and_vjp(monkeypatch, mode, x, g=None, **kwargs):
    """(loss, d loss / d x at cotangent g, StableHLO) of cross_entropy, jitted afresh."""
    monkeypatch.setenv(ENV, mode)

    def loss_and_vjp(x):
        loss, pullback = jax.vjp(lambda a: jsoftmax.cross_entropy(a, **kwargs), x)
        cotangent = jnp.ones_like(loss) if g is None else g.astype(loss.dtype)
        return loss, pullback(cotangent)[0]

    lowered = jax.jit(loss_and_vjp).lower(x)
    loss, dx = lowered.compile()(x)
    return np.asarray(loss), np.asarray(dx), lowered.as_text()


def _assert_agree(on, off, dtype, what, rows=False):
    """Same NaN / inf positions; finite entries within RTOL of each other, or, with ``rows``
    (gradients), within RTOL of the row's largest entry: with label smoothing an entry is
    ``p - s / C``, which cancels, and both paths round p and s / C apart."""
    a, b = to_f64(on), to_f64(off)
    for test in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(test(a), test(b)), f"{what}: {test.__name__} positions differ"
    finite = np.isfinite(b)
    atol = np.full(b.shape, ATOL[dtype])
    if rows and b.ndim:
        largest = np.max(np.where(finite, np.abs(b), 0), axis=-1, keepdims=True)
        atol = np.maximum(atol, RTOL[dtype] * largest)
    with np.errstate(invalid="ignore"):  # inf - inf at the non-finite entries, masked out
        bad = finite & ~(np.abs(a - b) <= atol + RTOL[dtype] * np.abs(b))
    assert not bad.any(), (
        f"{what}: {bad.sum()} entries differ, first at {np.argwhere(bad)[0].tolist()}: "
        f"{a[bad][0]!r} vs {b[bad][0]!r} (atol {atol[bad][0]:.3g}, rtol {RTOL[dtype]:.3g})"
    )


def _labels(rows, num_classes, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, num_classes, rows), jnp.int32)


OPTIONS = {
    "mean": {},
    "weight": {"weight": np.linspace(0.5, 2.0, 37).astype(np.float32)},
    "none": {"reduction": "none"},
    "sum-ignore": {"reduction": "sum", "ignore_index": 3},
    "row-where": {"where": np.arange(24) % 5 != 0},
    "logit-where": {"where": np.arange(24 * 37).reshape(24, 37) % 7 != 0},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing-none-ignore": {"label_smoothing": 0.3, "reduction": "none", "ignore_index": 5},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_kernels_match_xla_path(monkeypatch, option, dtype):
    x = _logits((24, 37), dtype, seed=1)
    labels = _labels(24, 37, seed=2)
    kwargs = {"labels": labels, **OPTIONS[option]}
    g = _logits((24,), "float32", seed=3) if kwargs.get("reduction") == "none" else None
    loss_on, dx_on, hlo_on = _loss_and_vjp(monkeypatch, "on", x, g, **kwargs)
    loss_off, dx_off, hlo_off = _loss_and_vjp(monkeypatch, "off", x, g, **kwargs)
    assert _targets(hlo_on) == TARGETS, _targets(hlo_on)
    assert not _targets(hlo_off), _targets(hlo_off)
    _assert_agree(loss_on, loss_off, "float32" if dtype == "float32" else dtype, "loss")
    _assert_agree(dx_on, dx_off, dtype, "gradient", rows=True)
    # And both against the definition in float64 (mean / sum / none with weights).
    if "where" not in kwargs:
        exact = ref_cross_entropy(
            x, labels, weight=kwargs.get("weight"), ignore_index=kwargs.get("ignore_index", -100),
            label_smoothing=kwargs.get("label_smoothing", 0.0),
            reduction=kwargs.get("reduction", "mean"),
        )  # fmt: skip
        tol = 1e-5 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(to_f64(loss_on), exact, rtol=tol, atol=tol)


def test_leading_axes_and_vmap(monkeypatch):
    # Rows under several leading axes go to the kernels as they are; vmap adds one more.
    x = _logits((2, 3, 5, 29), seed=4)
    labels = jnp.asarray(np.random.default_rng(5).integers(0, 29, (2, 3, 5)), jnp.int32)

    def per_batch(a, lab):
        return jsoftmax.cross_entropy(a, lab, reduction="sum")

    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)
        # A new function each time: jit caches its traces per function, whatever the mode.
        grad_of_vmap = jax.grad(lambda b: jnp.sum(jnp.sin(jax.vmap(per_batch)(b, labels))))
        lowered = jax.jit(grad_of_vmap).lower(x)
        results[mode] = (np.asarray(lowered.compile()(x)), _targets(lowered.as_text()))
    assert results["on"][1] == TARGETS and not results["off"][1]
    _assert_agree(results["on"][0], results["off"][0], "float32", "grad of vmap")


def _edge_rows(dtype):
    """Rows for every rule, with their labels: NaN, +inf (one and two), all -inf, half -inf with
    the label on a finite and on a -inf entry, an ignored row, labels out of range."""
    x = np.array(_logits((11, 40), "float32", seed=6))
    x[0, 5] = np.nan
    x[1, 7] = np.inf
    x[2, [3, 9]] = np.inf
    x[3] = -np.inf
    x[4, :20] = -np.inf
    x[5, :20] = -np.inf
    x[8, 1] = np.nan  # ignored: 0 even with a NaN logit
    x[10, 2] = np.inf  # the label on a finite entry next to +inf
    labels = np.array([1, 7, 3, 2, 30, 10, 0, 3, -100, 40, 5], np.int32)
    labels[6] = -5  # a negative label that is not ignore_index: out of range, NaN
    return jnp.asarray(x).astype(dtype), jnp.asarray(labels)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_edge_rows_follow_the_xla_path(monkeypatch, dtype, smoothing):
    x, labels = _edge_rows(dtype)
    g = _logits((11,), "float32", seed=7)
    kwargs = {"labels": labels, "reduction": "none", "label_smoothing": smoothing}
    on = _loss_and_vjp(monkeypatch, "on", x, g, **kwargs)
    off = _loss_and_vjp(monkeypatch, "off", x, g, **kwargs)
    assert _targets(on[2]) == TARGETS and not _targets(off[2])
    for row in range(11):
        _assert_agree(on[0][row], off[0][row], "float32", f"{dtype} row {row} loss")
        _assert_agree(on[1][row], off[1][row], dtype, f"{dtype} row {row} gradient", rows=True)
    loss, dx = to_f64(on[0]), to_f64(on[1])
    if smoothing:  # smoothing mass on -inf logits or next to +inf: +inf (as torch)
        assert np.isposinf(loss[[1, 3, 4, 5, 10]]).all() and np.isnan(loss[[0, 6, 9]]).all()
        assert loss[2] == np.inf and loss[8] == 0 and np.all(dx[8] == 0)
        return
    # The rules, spelled out (both paths): NaN row NaN; the label among two +inf gets log 2;
    # a -inf label has loss +inf and every -inf logit gradient 0; ignored rows 0; out of range NaN.
    assert np.isnan(loss[0]) and np.isnan(loss[6]) and np.isnan(loss[9])
    assert loss[1] == 0 and np.isclose(loss[2], np.log(2), rtol=RTOL[dtype])
    assert np.isfinite(loss[4]) and np.isposinf(loss[5])
    assert loss[8] == 0 and np.all(dx[8] == 0)
    assert np.all(dx[3] == 0) and np.all(dx[4, :20] == 0) and np.all(np.isnan(dx[9]))
    # +inf off the label: loss +inf; the gradient g at the +inf entry, -g at the label, 0 else.
    assert np.isposinf(loss[10])
    expected = np.zeros(40)
    expected[2], expected[5] = to_f64(g)[10], -to_f64(g)[10]
    np.testing.assert_allclose(dx[10], expected, rtol=RTOL[dtype])


def test_a_single_class(monkeypatch):
    # Rows of one entry: probability 1, loss 0, gradient 0 (an all -inf row: loss +inf).
    x = jnp.array([[2.0], [-7.5], [-jnp.inf]], jnp.float32)
    labels = jnp.zeros(3, jnp.int32)
    on = _loss_and_vjp(monkeypatch, "on", x, labels=labels, reduction="none")
    off = _loss_and_vjp(monkeypatch, "off", x, labels=labels, reduction="none")
    assert _targets(on[2]) == TARGETS and not _targets(off[2])
    np.testing.assert_array_equal(on[0], off[0])
    np.testing.assert_array_equal(on[1], off[1])
    np.testing.assert_array_equal(on[0], [0.0, 0.0, np.inf])
    np.testing.assert_array_equal(on[1], np.zeros((3, 1)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_gradients_under_vmap_and_scan(monkeypatch, dtype):
    x = _logits((2, 3, 6, 33), dtype, seed=20)
    labels = jnp.asarray(np.random.default_rng(21).integers(0, 33, (3, 6)), jnp.int32)
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)

        def total(xs, lab=labels):
            per = jax.vmap(lambda a, y: jsoftmax.cross_entropy(a, y, reduction="sum"))
            return jax.lax.scan(lambda c, a: (c + jnp.sum(per(a, lab)), None), 0.0, xs)[0]

        lowered = jax.jit(jax.grad(total)).lower(x)
        results[mode] = (np.asarray(lowered.compile()(x)), _targets(lowered.as_text()))
    assert results["on"][1] == TARGETS and not results["off"][1]
    _assert_agree(results["on"][0], results["off"][0], dtype, f"{dtype} grad")


def test_labels_varying_where_the_logits_do_not_keep_the_xla_path(monkeypatch):
    # Inside shard_map, replicated logits with labels split over the mesh: the loss varies with
    # the labels. The primitives type their results after the logits, so this case stays on the
    # XLA path (it used to fail the custom_jvp type check); the result matches unsplit labels.
    monkeypatch.setenv(ENV, "on")
    mesh = jax.make_mesh((1,), ("v",))
    P, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    x = jax.device_put(_logits((4, 9), seed=22), named(mesh, P()))
    labels = jax.device_put(_labels(4, 9, seed=23), named(mesh, P("v")))

    def loss(a, y):
        return jsoftmax.cross_entropy(a, y, reduction="none")

    split = jax.shard_map(loss, mesh=mesh, in_specs=(P(), P("v")), out_specs=P("v"))
    fn = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(split(a, labels)))))
    assert not _targets(fn.lower(x).as_text())
    expected = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(loss(a, labels)))))(x)
    np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(expected), rtol=1e-6, atol=1e-7)
    # Both split alike: the kernels.
    both = jax.shard_map(loss, mesh=mesh, in_specs=(P("v"), P("v")), out_specs=P("v"))
    fn = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(both(a, labels)))))
    x_split = jax.device_put(x, named(mesh, P("v")))
    assert _targets(fn.lower(x_split).as_text()) == TARGETS
    np.testing.assert_allclose(np.asarray(fn(x_split)), np.asarray(expected), rtol=1e-6, atol=1e-7)


def test_long_rows_are_accurate(monkeypatch):
    """Loss and gradient of a 2^22-long row against float64: within 2x of the XLA path's error
    (an error below half a float32 ulp counts as half an ulp)."""
    n = 2**22
    x = _logits((2, n), seed=8)
    labels = jnp.array([5, n - 1], jnp.int32)
    g = jnp.array([1.0, -0.5], jnp.float32)
    x64 = to_f64(x)
    lse = np.log(np.sum(np.exp(x64 - x64.max(-1, keepdims=True)), -1)) + x64.max(-1)
    exact_loss = lse - x64[np.arange(2), np.asarray(labels)]
    probs = np.exp(x64 - lse[:, None])
    onehot = np.arange(n) == np.asarray(labels)[:, None]
    exact_dx = np.asarray(g, np.float64)[:, None] * (probs - onehot)
    errors = {}
    for mode in ("on", "off"):
        loss, dx, hlo = _loss_and_vjp(monkeypatch, mode, x, g, labels=labels, reduction="none")
        assert _targets(hlo) == (TARGETS if mode == "on" else set())
        errors[mode] = (relative_error(loss, exact_loss), relative_error(dx, exact_dx))
    floor = EPS32 / 2
    for which, kernel, xla in zip(("loss", "gradient"), errors["on"], errors["off"], strict=True):
        assert kernel <= 2 * max(xla, floor), f"{which}: kernel {kernel:.3g}, XLA path {xla:.3g}"


# --------------------------------------------------------------------------------------------
# where the XLA path is kept


NOT_ELIGIBLE = {
    "label smoothing with class weights": (
        {"label_smoothing": 0.1, "weight": np.linspace(0.5, 1.5, 9)},
        (6, 9),
        "float32",
    ),
    "class axis not last": ({"axis": 0}, (9, 6), "float32"),
    "probability targets": ({"labels": "probabilities"}, (6, 9), "float32"),
    "float64": ({}, (6, 9), "float64"),
}


@pytest.mark.parametrize("case", sorted(NOT_ELIGIBLE))
def test_xla_path_where_the_kernels_do_not_apply(monkeypatch, case):
    kwargs, shape, dtype = NOT_ELIGIBLE[case]
    monkeypatch.setenv(ENV, "on")
    kwargs = dict(kwargs)
    rows = shape[1] if kwargs.get("axis") == 0 else shape[0]
    classes = shape[0] if kwargs.get("axis") == 0 else shape[1]
    if kwargs.get("labels") == "probabilities":
        labels = jnp.full(shape, 1.0 / classes, jnp.float32)
        kwargs.pop("labels")
    else:
        labels = _labels(rows, classes, seed=9)
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        x = jnp.asarray(np.asarray(_logits(shape, seed=10)), dtype)
        grad = jax.jit(jax.value_and_grad(lambda a: jsoftmax.cross_entropy(a, labels, **kwargs)))
        text = grad.lower(x).as_text()
        loss, dx = grad(x)
    assert not _targets(text), _targets(text)
    assert np.isfinite(to_f64(loss)) and np.all(np.isfinite(to_f64(dx)))


def test_gpu_host_and_cuda_lowering_use_the_formulas(monkeypatch):
    # A GPU host has one CPU device too; there the kernels must not be chosen, and a CUDA
    # lowering never calls them.
    monkeypatch.setenv(ENV, "on")
    x, labels = _logits((4, 11), seed=12), _labels(4, 11, seed=13)
    fn = jax.jit(jax.value_and_grad(lambda a: jsoftmax.cross_entropy(a, labels)))
    assert _targets(fn.trace(x).lower(lowering_platforms=("cpu",)).as_text()) == TARGETS
    # Traced here (the primitives), lowered for CUDA: their formulas.
    cuda = fn.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert not _targets(cuda) and "stablehlo.exponential" in cuda
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.clear_caches()
    try:
        assert not _targets(fn.trace(x).lower(lowering_platforms=("cpu",)).as_text())
    finally:
        monkeypatch.undo()
        jax.clear_caches()


# --------------------------------------------------------------------------------------------
# transformations around the kernels


CONTEXTS = {
    "grad": lambda loss: jax.grad(loss),
    "grad-scan": lambda loss: jax.grad(
        lambda xs: jax.lax.scan(lambda c, x: (c + loss(x), None), 0.0, xs)[0]
    ),
    "grad-checkpoint": lambda loss: jax.grad(jax.checkpoint(loss)),
    "hessian": lambda loss: jax.hessian(loss),
    "jacfwd": lambda loss: jax.jacfwd(loss),
}


@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_transformations_agree_with_the_xla_path(monkeypatch, context):
    scan = context == "grad-scan"
    x = _logits((3, 4, 7) if scan else (4, 7), seed=14)
    labels = jnp.array([6, 0, 3, 2], jnp.int32)
    weight = jnp.linspace(0.5, 2.0, 7)

    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(ENV, mode)
        # A new function each time: jit and checkpoint cache their traces per function.
        loss = partial(jsoftmax.cross_entropy, labels=labels, weight=weight)
        lowered = jax.jit(CONTEXTS[context](loss)).lower(x)
        results[mode] = (np.asarray(lowered.compile()(x)), _targets(lowered.as_text()))
    assert "jsoftmax_cross_entropy_stats" in results["on"][1] and not results["off"][1]
    if context.startswith("grad"):  # reverse mode: the backward kernel
        assert "jsoftmax_cross_entropy_bwd" in results["on"][1]
    np.testing.assert_allclose(results["on"][0], results["off"][0], rtol=1e-5, atol=1e-6)
    if context == "hessian":  # against float64 (the second order is the formula's)
        with enable_x64():
            exact = jax.hessian(
                lambda a: (
                    jnp.sum(
                        weight[labels]
                        * -jnp.take_along_axis(jax.nn.log_softmax(a), labels[:, None], axis=-1)[
                            :, 0
                        ]
                    )
                    / jnp.sum(weight[labels])
                )
            )(jnp.asarray(x, jnp.float64))
        np.testing.assert_allclose(results["on"][0], np.asarray(exact), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_check_grads_through_the_kernels(monkeypatch, smoothing):
    # Forward and reverse mode to second order by finite differences, in float32 (the kernels'
    # dtype; float64 takes the XLA path), on logits of moderate size.
    monkeypatch.setenv(ENV, "on")
    x = _logits((3, 6), seed=15, scale=1.0)
    labels = jnp.array([1, 5, 0], jnp.int32)
    fn = partial(jsoftmax.cross_entropy, labels=labels, reduction="none", label_smoothing=smoothing)
    assert _targets(jax.jit(jax.grad(lambda a: fn(a).sum())).lower(x).as_text()) == TARGETS
    check_grads(fn, (x,), order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_check_grads_detects_a_wrong_backward_kernel(monkeypatch):
    # The check above can fail: with the backward pass off by a factor (the primitive's
    # transposed lowering doubled), reverse mode no longer matches finite differences.
    from jsoftmax import _primitives

    monkeypatch.setenv(ENV, "on")
    x = _logits((3, 6), seed=15, scale=1.0)
    fn = partial(jsoftmax.cross_entropy, labels=jnp.array([1, 5, 0]), reduction="none")
    original = _primitives._label_tangent_cpu

    def doubled(*args, **params):
        return 2 * original(*args, **params) if params["transposed"] else original(*args, **params)

    monkeypatch.setattr(_primitives, "_label_tangent_cpu", doubled)
    _primitives.mlir.register_lowering(
        _primitives.label_tangent_p,
        _primitives._lowering(_primitives._label_tangent_formula, doubled, cpu=True),
        "cpu",
    )
    jax.clear_caches()
    try:
        with pytest.raises(AssertionError):
            check_grads(fn, (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)
    finally:
        _primitives.mlir.register_lowering(
            _primitives.label_tangent_p,
            _primitives._lowering(_primitives._label_tangent_formula, original, cpu=True),
            "cpu",
        )
        jax.clear_caches()
