"""Every JAX transformation, composed with every control-flow and sharding wrapper (issue 15).

The functions under test run in float32, where the CPU kernels take part (the root conftest sets
JSOFTMAX_CPU_KERNEL=on); the oracle is the same transformation applied to jax.nn /
jax.scipy.special.logsumexp / optax (or a formula written with jax.nn.log_softmax) in float64.
A transformation that loses a rule, a batching dimension or a branch shows up as a value
mismatch, a NaN or a trace-time error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import enable_x64, random_logits, to_f64, tolerance
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _cross_entropy as ce_impl
from jsoftmax import _kernel
from jsoftmax import _softmax as impl

ROWS, CLASSES, BATCH = 2, 4, 2
SMOOTHING = 0.1
GRAD_TOL = tolerance("float32", grad=True)


def _mesh():
    # Two of the eight simulated CPU devices; Auto axes, as tests/test_sharding.py builds them.
    return jax.make_mesh((2,), ("v",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])


def _rng_array(shape: tuple[int, ...], salt: int) -> np.ndarray:
    """A fixed standard-normal array for a shape (tangents and cotangents)."""
    return np.random.default_rng([salt, *shape]).standard_normal(shape)


# --------------------------------------------------------------------------------------------
# the cases: a jsoftmax function of x (an array, or (logits, targets) when the targets get a
# tangent too) with its constant arguments, and its jax.nn / optax oracle


@dataclass(frozen=True)
class Case:
    name: str
    # fn(x, aux, axis_name): jsoftmax; ref(x, aux): the oracle, plain differentiable JAX.
    fn: Callable[..., jax.Array]
    ref: Callable[..., jax.Array]
    aux: tuple[np.ndarray, ...]
    # shard_map specs when the class axis is split across "v": aux, and the output.
    aux_specs: tuple[Any, ...]
    out_spec: Any
    pair: bool = False  # x is (logits, targets)


_MASK = np.array([[True, False, True, True], [False, True, True, False]])
_LABELS = np.array([2, 0], np.int32)
_WEIGHT = np.array([0.5, 2.0, 1.0, 1.5], np.float32)
_TARGETS = np.random.default_rng(3).dirichlet(np.ones(CLASSES), ROWS).astype(np.float32)


def _finite_part(y: jax.Array) -> jax.Array:
    # log_softmax is -inf at masked entries: they are dropped before contracting with a cotangent.
    return jnp.where(jnp.isneginf(y), 0, y)


def _nn_normalizer(name: str, x: jax.Array, where: Any) -> jax.Array:
    if name == "logsumexp":
        return jax.scipy.special.logsumexp(x, axis=-1, where=where)
    return getattr(jax.nn, name)(x, axis=-1, where=where)


def _normalizer_case(name: str, masked: bool) -> Case:
    def fn(x, aux, axis_name=None):
        where = aux[0] if masked else None
        return getattr(jsoftmax, name)(x, where=where, axis_name=axis_name)

    def ref(x, aux):
        return _nn_normalizer(name, x, aux[0] if masked else None)

    return Case(
        name=f"{name}{'-where' if masked else ''}",
        fn=fn,
        ref=ref,
        aux=(_MASK,) if masked else (),
        aux_specs=(P(None, "v"),) if masked else (),
        out_spec=P() if name == "logsumexp" else P(None, "v"),
    )


def _smoothed_labels_ref(x, aux, smoothing=SMOOTHING):
    """torch's weighted, label-smoothed mean cross-entropy, written with jax.nn.log_softmax."""
    labels, weight = aux
    one_hot = jax.nn.one_hot(labels, CLASSES, dtype=x.dtype)
    label_weight = weight[labels].astype(x.dtype)
    target = (1 - smoothing) * one_hot * label_weight[:, None] + smoothing / CLASSES * weight
    loss = -jnp.sum(target * jax.nn.log_softmax(x, axis=-1), axis=-1)
    return jnp.sum(loss) / jnp.sum(label_weight)


def _labels_case(smoothing: float, weighted: bool = True) -> Case:
    # Without smoothing, or without class weights, cross_entropy takes its own primitives (on
    # CPU, its kernels); smoothing with class weights runs the XLA formula.
    def fn(x, aux, axis_name=None):
        labels, weight = aux
        return jsoftmax.cross_entropy(
            x, labels, weight=weight if weighted else None, label_smoothing=smoothing,
            axis_name=axis_name,
        )  # fmt: skip

    def ref(x, aux):
        labels, weight = aux
        return _smoothed_labels_ref(x, (labels, weight if weighted else np.ones_like(weight)),
                                    smoothing=smoothing)  # fmt: skip

    return Case(
        name="cross_entropy-labels"
        + ("" if smoothing else "-unsmoothed")
        + ("" if weighted else "-unweighted"),
        fn=fn,
        ref=ref,
        aux=(_LABELS, _WEIGHT),
        aux_specs=(P(), P()),
        out_spec=P(),
    )


def _probs_case() -> Case:
    # The targets are differentiated too: x is (logits, targets).
    def fn(x, aux, axis_name=None):
        del aux
        logits, targets = x
        return jsoftmax.cross_entropy(logits, targets, axis_name=axis_name)

    def ref(x, aux):
        del aux
        return jnp.mean(optax.softmax_cross_entropy(*x))

    return Case(
        name="cross_entropy-probabilities",
        fn=fn,
        ref=ref,
        aux=(),
        aux_specs=(),
        out_spec=P(),
        pair=True,
    )


CASES = {
    case.name: case
    for case in (
        *(_normalizer_case(n, m) for n in ("softmax", "log_softmax", "logsumexp") for m in (0, 1)),
        _labels_case(SMOOTHING),
        _labels_case(0.0),
        _labels_case(SMOOTHING, weighted=False),
        _probs_case(),
    )
}


def _input(case: Case, batch: int | None, dtype: str) -> Any:
    shape = (ROWS, CLASSES) if batch is None else (batch, ROWS, CLASSES)
    logits = random_logits(shape, seed=11, scale=1.5).astype(dtype)
    if not case.pair:
        return logits
    targets = np.broadcast_to(_TARGETS, shape)
    return logits, jnp.asarray(targets, dtype)


# --------------------------------------------------------------------------------------------
# the transformations, all at once: one jitted bundle per function


def _cotangent(y: jax.Array, given: Any, salt: int) -> jax.Array:
    return jnp.asarray(_rng_array(y.shape, salt) if given is None else given, y.dtype)


def _scalar(fn: Callable, cotangent: Any = None) -> Callable:
    """x -> sum(c * fn(x)) with a fixed cotangent c (the finite part of fn's output)."""

    def scalar(x):
        y = _finite_part(fn(x))
        return jnp.sum(_cotangent(y, cotangent, 1) * y)

    return scalar


def _constant_like(a: jax.Array, value: np.ndarray) -> jax.Array:
    """``value`` in ``a``'s dtype, varying over the same shard_map axes as ``a``."""
    out = jnp.asarray(value, a.dtype)
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)  # jax 0.10; ``vma`` before
    varying = tuple(sorted(mat.varying if mat is not None else getattr(aval, "vma", ())))
    return lax.pcast(out, varying, to="varying") if varying else out


def _tangent_like(x: Any, salt: int = 2) -> Any:
    return jax.tree.map(lambda a: _constant_like(a, _rng_array(a.shape, salt)), x)


def _all_transformations(
    fn: Callable, tangent: Any = None, cotangents: tuple[Any, Any] = (None, None)
) -> Callable:
    """x -> {transformation: result} for every forward-mode and higher-order composition.

    The tangent and the two output cotangents are fixed arrays of their shapes unless given.
    """
    scalar = _scalar(fn, cotangents[0])

    def bundle(x):
        v = _tangent_like(x) if tangent is None else tangent
        y, lin = jax.linearize(fn, x)

        def second_directional(z):
            return jax.jvp(lambda u: jax.jvp(scalar, (u,), (v,))[1], (z,), (v,))[1]

        def tangent_readout(z):
            out_tangent = jax.jvp(fn, (z,), (v,))[1]
            return jnp.sum(_cotangent(out_tangent, cotangents[1], 3) * out_tangent)

        return {
            "jvp": jax.jvp(fn, (x,), (v,)),
            "jacfwd": jax.jacfwd(fn)(x),
            "linearize": (y, lin(v)),
            "hessian": jax.hessian(scalar)(x),
            "jvp(grad)": jax.jvp(jax.grad(scalar), (x,), (v,)),
            "grad(jvp)": jax.grad(tangent_readout)(x),
            "third order": jax.grad(second_directional)(x),
        }

    return bundle


# --------------------------------------------------------------------------------------------
# the wrappers: where the function sits when it is transformed


def _map_instances(fn: Callable, xs: Any) -> Any:
    """fn on each instance of the leading axis, stacked (a Python loop: no vmap involved)."""
    results = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(BATCH)]
    return jax.tree.map(lambda *parts: jnp.stack(parts), *results)


def _scan(fn: Callable) -> Callable:
    return lambda xs: lax.scan(lambda carry, x: (carry, fn(x)), 0.0, xs)[1]


def _cond(fn: Callable) -> Callable:
    def zeros(x):
        return jax.tree.map(jnp.zeros_like, fn(x))

    def wrapped(x):
        # A data-dependent predicate (True for every input here), so both branches are traced.
        predicate = ~jnp.isnan(jax.tree.leaves(x)[0]).all()
        return lax.cond(predicate, fn, zeros, x)

    return wrapped


def _shard_rows(fn: Callable) -> Callable:
    """shard_map without axis_name: each of the two devices gets one instance."""

    def per_device(xs):
        out = fn(jax.tree.map(lambda a: a[0], xs))
        return jax.tree.map(lambda a: a[None], out)

    return lambda xs: jax.shard_map(per_device, mesh=_mesh(), in_specs=P("v"), out_specs=P("v"))(xs)


# name -> (batched, wrap): a batched wrapper maps a per-instance function over BATCH instances.
WRAPPERS: dict[str, tuple[bool, Callable[[Callable], Callable]]] = {
    "plain": (False, lambda fn: fn),
    "vmap": (True, jax.vmap),
    "scan": (True, _scan),
    "map": (True, lambda fn: partial(lax.map, fn)),
    "checkpoint": (False, jax.checkpoint),
    "cond": (False, _cond),
    "shard_map": (True, _shard_rows),
}


def _bound(case: Case, aux: tuple[Any, ...], axis_name: Any = None) -> Callable:
    return lambda x: case.fn(x, aux, axis_name)


def _class_sharded(case: Case) -> Callable:
    """The case inside shard_map with axis_name: the classes split across two devices."""
    x_spec = (P(None, "v"), P(None, "v")) if case.pair else P(None, "v")

    def body(x, *aux):
        return case.fn(x, aux, "v")

    return lambda x: jax.shard_map(
        body,
        mesh=_mesh(),
        in_specs=(x_spec, *case.aux_specs),
        out_specs=case.out_spec,
    )(x, *case.aux)


@cache
def _oracle(case_name: str, batched: bool, placement: str) -> Any:
    """The transformations of the float64 oracle, as numpy (computed once per layout)."""
    case = CASES[case_name]
    with enable_x64():
        ref = partial(case.ref, aux=tuple(jnp.asarray(a) for a in case.aux))
        x = _input(case, BATCH if batched else None, "float64")
        if batched and placement == "inner":
            result = jax.jit(_all_transformations(jax.vmap(ref)))(x)
        elif batched:
            result = jax.jit(jax.vmap(_all_transformations(ref)))(x)
        else:
            result = jax.jit(_all_transformations(ref))(x)
        return jax.tree.map(np.asarray, result)


def _assert_matches(got: Any, expected: Any) -> None:
    for transformation, value in got.items():
        got_leaves = jax.tree.leaves(value)
        expected_leaves = jax.tree.leaves(expected[transformation])
        assert len(got_leaves) == len(expected_leaves), transformation
        for got_leaf, expected_leaf in zip(got_leaves, expected_leaves, strict=True):
            got64 = to_f64(got_leaf)
            assert got64.shape == expected_leaf.shape, transformation
            assert not np.isnan(got64).any(), f"{transformation}: NaN"
            np.testing.assert_allclose(got64, expected_leaf, **GRAD_TOL, err_msg=transformation)


# Every wrapper around the function before it is transformed (inner), where the rules meet
# the wrapper's own transformation rules. Outer placement (the wrapper around already transformed
# code) only for vmap, the per-example Hessian users write: checkpoint and cond around code that
# is not differentiated further are the identity, and scan, map and shard_map over transformed
# code run the "plain" transformations in a loop or on each device (each costs a compilation,
# and this file keeps to a time budget).
PLACEMENTS = [
    pytest.param("plain", "inner", id="plain"),
    *(pytest.param(w, "inner", id=f"inner-{w}") for w in WRAPPERS if w != "plain"),
    pytest.param("vmap", "outer", id="outer-vmap"),
    pytest.param("shard_map-axis_name", "inner", id="inner-shard_map-axis_name"),
]


@pytest.mark.parametrize(("wrapper", "placement"), PLACEMENTS)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_every_transformation_matches_the_oracle(case_name, wrapper, placement):
    """jvp, jacfwd, linearize, hessian, jvp(grad), grad(jvp) and a third derivative, with the
    function inside the wrapper (inner: ``hessian(vmap(f))``) or the wrapper around them all
    (outer: ``vmap(hessian(f))``)."""
    case = CASES[case_name]
    if wrapper == "shard_map-axis_name":
        fn, batched = _class_sharded(case), False
    else:
        batched, wrap = WRAPPERS[wrapper]
        fn = _bound(case, case.aux)
    x = _input(case, BATCH if batched else None, "float32")
    if wrapper == "shard_map-axis_name" or wrapper == "plain":
        got = jax.jit(_all_transformations(fn))(x)
    elif placement == "inner":
        got = jax.jit(_all_transformations(wrap(fn)))(x)
    else:
        got = jax.jit(wrap(_all_transformations(fn)))(x)
    _assert_matches(got, _oracle(case_name, batched, placement))


# --------------------------------------------------------------------------------------------
# edge rows: -inf entries, a fully masked row, a +inf entry, each transformed

EDGE_ROWS, EDGE_CLASSES = 4, 5  # distinct sizes: an axis of size 4 is a row axis


def _edge_input() -> tuple[jax.Array, np.ndarray]:
    """Rows: finite with one masked entry; two -inf entries; fully masked; one +inf entry."""
    x = np.array(random_logits((EDGE_ROWS, EDGE_CLASSES), seed=21, scale=1.5))
    x[1, [0, 3]] = -np.inf
    x[3, 2] = np.inf
    where = np.ones((EDGE_ROWS, EDGE_CLASSES), bool)
    where[0, 1] = False
    where[2] = False
    return jnp.asarray(x), where


def _rows(leaf: Any, rows: list[int]) -> np.ndarray:
    """``leaf`` restricted to ``rows`` along every row axis."""
    out = to_f64(leaf)
    for axis, size in enumerate(out.shape):
        if size == EDGE_ROWS:
            out = np.take(out, rows, axis=axis)
    return out


def _derivatives(results: dict[str, Any]) -> dict[str, list[Any]]:
    """The derivative leaves of a bundle (its primal outputs dropped)."""
    primal_first = {"jvp", "linearize"}
    return {
        key: jax.tree.leaves(value[1] if key in primal_first else value)
        for key, value in results.items()
    }


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_edge_rows_under_every_transformation(name):
    x, where = _edge_input()
    fn = getattr(jsoftmax, name)
    # One tangent and two cotangents for all rows, sliced for the row-wise oracles below.
    tangent = _rng_array(x.shape, 2)
    out_shape = x.shape[:1] if name == "logsumexp" else x.shape
    cotangents = (_rng_array(out_shape, 1), _rng_array(out_shape, 3))

    def transformed(f, rows, dtype):
        return jax.jit(
            _all_transformations(
                f, jnp.asarray(tangent[rows], dtype), tuple(c[rows] for c in cotangents)
            )
        )

    got = transformed(lambda a: fn(a, where=where), slice(None), jnp.float32)(x)
    got_derivatives = _derivatives(got)
    for key, leaves in got_derivatives.items():
        for leaf in leaves:
            assert not np.isnan(to_f64(leaf)).any(), f"{key}: NaN"

    x64 = to_f64(x)
    with enable_x64():
        # Rows 0-1: jax.nn with the -inf entries masked (finite there). Row 3: the +inf limit,
        # jax.nn at a logit so large that exp() of every other entry underflows in float64.
        live = where & np.isfinite(x64)
        finite = np.where(np.isfinite(x64), x64, 0.0)
        ref_finite = transformed(
            lambda a: _nn_normalizer(name, a, live[:2]), slice(0, 2), jnp.float64
        )(jnp.asarray(finite[:2]))
        limit = np.where(x64 == np.inf, 1e4, x64)[3:]
        ref_limit = transformed(lambda a: _nn_normalizer(name, a, None), slice(3, 4), jnp.float64)(
            jnp.asarray(limit)
        )
    ref_finite_derivatives = _derivatives(ref_finite)
    ref_limit_derivatives = _derivatives(ref_limit)
    for key, leaves in got_derivatives.items():
        for leaf, finite_leaf, limit_leaf in zip(
            leaves, ref_finite_derivatives[key], ref_limit_derivatives[key], strict=True
        ):
            np.testing.assert_allclose(_rows(leaf, [0, 1]), finite_leaf, **GRAD_TOL, err_msg=key)
            if name == "log_softmax":
                # Next to +inf every finite entry's output is -inf, a constant (as for masked
                # entries), and the +inf entry's is 0: all derivatives are 0, where the finite
                # surrogate has -1e4-ish outputs that still move.
                np.testing.assert_array_equal(_rows(leaf, [3]), 0.0, err_msg=key)
            else:
                np.testing.assert_allclose(_rows(leaf, [3]), limit_leaf, **GRAD_TOL, err_msg=key)
            # The fully masked row: exactly 0 (jax.nn: NaN or 0 by accident of its formula).
            np.testing.assert_array_equal(_rows(leaf, [2]), 0.0, err_msg=key)

    # The primal values of the edge rows, as documented.
    y, tangent = got["jvp"]
    y = to_f64(y)
    if name == "logsumexp":
        assert y[2] == -np.inf and y[3] == np.inf
    elif name == "softmax":
        np.testing.assert_array_equal(y[2], 0.0)
        np.testing.assert_array_equal(y[3], np.eye(EDGE_CLASSES)[2])
    else:
        np.testing.assert_array_equal(y[2], -np.inf)
        np.testing.assert_array_equal(y[3], np.where(np.arange(EDGE_CLASSES) == 2, 0.0, -np.inf))
    if name != "logsumexp":
        # Masked and -inf entries are constants: their tangent is exactly 0.
        assert np.all(to_f64(tangent)[(~where) | np.isneginf(x64)] == 0.0)


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_ignored_rows_and_minus_inf_logits_of_cross_entropy_transform_to_zero(fill):
    # The docstring: an ignored row gives loss 0 and gradient 0 even when its logits are NaN or
    # inf. Every derivative through it must be 0 too, and a -inf logit off the label (a masked
    # class) must be a constant at every order.
    x = np.array(random_logits((3, 5), seed=22))
    x[1] = fill
    x[2, 4] = -np.inf
    labels = jnp.array([1, -100, 0])

    def loss(a):
        return jsoftmax.cross_entropy(a, labels)

    got = jax.jit(_all_transformations(loss))(jnp.asarray(x))
    derivatives = _derivatives(got)
    derivatives["jacrev(grad)"] = [jax.jit(jax.jacrev(jax.grad(loss)))(jnp.asarray(x))]
    if fill != fill:
        # The documented limit (README, cross-entropy table): reverse mode through the tangent
        # rule (grad of jvp, jacrev of grad, third order) meets the ignored row's NaN row values,
        # and 0 * NaN is NaN; zeroing the row first would cost a logits-sized copy in every
        # training step. Pinned, so that a fix shows here.
        for key in ("grad(jvp)", "third order", "jacrev(grad)"):
            leaves = derivatives.pop(key)
            assert any(np.isnan(to_f64(leaf)).any() for leaf in leaves), key
    for key, leaves in derivatives.items():
        for leaf in leaves:
            leaf = to_f64(leaf)
            assert not np.isnan(leaf).any(), f"{key}: NaN at {np.argwhere(np.isnan(leaf))[:3]}"
            for axis, size in enumerate(leaf.shape):
                if size == 3:
                    np.testing.assert_array_equal(np.take(leaf, 1, axis=axis), 0.0, err_msg=key)
    # d loss / d x[2, 4] and every second derivative through it.
    np.testing.assert_array_equal(to_f64(got["jacfwd"])[2, 4], 0.0)
    np.testing.assert_array_equal(to_f64(got["hessian"])[2, 4], 0.0)
    np.testing.assert_array_equal(to_f64(got["hessian"])[:, :, 2, 4], 0.0)


# --------------------------------------------------------------------------------------------
# numerical gradient checks, forward and reverse, to second order, in float64


def _check_grads_cases() -> dict[str, tuple[Callable, Callable]]:
    """name -> (function, args maker); the args are made under x64."""

    def logits() -> jax.Array:
        return random_logits((ROWS, CLASSES + 1), "float64", seed=31)

    mask = np.array([[True, True, False, True, True], [False, True, True, True, False]])
    cases: dict[str, tuple[Callable, Callable]] = {}
    for name in ("softmax", "log_softmax", "logsumexp"):
        fn = getattr(jsoftmax, name)
        cases[name] = (fn, lambda: (logits(),))
        cases[f"{name}-where"] = (partial(fn, where=mask), lambda: (logits(),))
    weight = np.array([0.5, 2.0, 1.0, 1.5, 0.75])
    cases["cross_entropy-labels"] = (
        partial(
            jsoftmax.cross_entropy,
            labels=jnp.array([4, 1]),
            weight=weight,
            label_smoothing=SMOOTHING,
        ),
        lambda: (logits(),),
    )
    targets = np.random.default_rng(32).dirichlet(np.ones(CLASSES + 1), ROWS)
    cases["cross_entropy-probabilities"] = (
        partial(jsoftmax.cross_entropy, label_smoothing=SMOOTHING, reduction="none"),
        lambda: (logits(), jnp.asarray(targets)),
    )
    return cases


CHECK_GRADS_CASES = _check_grads_cases()


@pytest.mark.parametrize("name", sorted(CHECK_GRADS_CASES))
def test_check_grads_forward_and_reverse_to_second_order(name):
    fn, make_args = CHECK_GRADS_CASES[name]
    with enable_x64():
        args = make_args()
        assert all(a.dtype == jnp.float64 for a in args)
        check_grads(fn, args, order=2, modes=["fwd", "rev"])


def test_check_grads_detects_a_wrong_forward_rule():
    # The check above can fail: a function whose JVP rule is off by a factor fails it in "fwd".
    @jax.custom_jvp
    def wrong(x):
        return jnp.sin(x)

    wrong.defjvps(lambda t, y, x: 2 * jnp.cos(x) * t)
    with enable_x64(), pytest.raises(AssertionError):
        check_grads(wrong, (jnp.array([0.3, 1.2]),), order=1, modes=["fwd"])


# --------------------------------------------------------------------------------------------
# reverse mode keeps its promise: one saved array, the backward kernel, no retrace


NORMALIZER_NAMES = ["softmax", "log_softmax", "logsumexp"]


def _residuals(fn: Callable, *args: Any) -> list[tuple[Any, str]]:
    from jax._src.ad_checkpoint import saved_residuals  # the utility behind print_saved_residuals

    return saved_residuals(fn, *args)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "where"])
@pytest.mark.parametrize("name", NORMALIZER_NAMES)
def test_reverse_mode_saves_one_array(name, masked):
    fn = getattr(jsoftmax, name)
    x = random_logits((3, 8), seed=33)
    where = jnp.arange(8) < 6 if masked else None
    residuals = _residuals(lambda a: fn(a, where=where), x)
    # softmax / log_softmax: the output; logsumexp: the probabilities, of x's shape. On the CPU
    # kernel path (unmasked float32) also an int32 scalar saying whether the array is the output
    # or the input: under jit, where the output is dead, the input replaces it
    # (test_reverse_mode_starts_from_the_output_where_it_is_used_else_from_the_input).
    kernel_path = name != "logsumexp" and not masked and _kernel.eligible(x, (1,), None)
    arrays = [(tuple(aval.shape), why) for aval, why in residuals if aval.shape != ()]
    scalars = [aval.dtype for aval, _ in residuals if aval.shape == ()]
    assert [shape for shape, _ in arrays] == [(3, 8)], residuals
    assert "argument" not in arrays[0][1], residuals
    assert scalars == ([jnp.dtype(jnp.int32)] if kernel_path else []), residuals
    # The mask as an argument (not differentiated) adds nothing of its own.
    masked_arg = _residuals(lambda a, m: fn(a, where=m), x, jnp.arange(8) < 6)
    saved = [(tuple(aval.shape), why) for aval, why in masked_arg if "argument" not in why]
    assert [shape for shape, _ in saved] == [(3, 8)], masked_arg
    # Under vmap: one batched array (and the scalar, unbatched).
    batched = _residuals(jax.vmap(lambda a: fn(a, where=where)), jnp.stack([x, -x]))
    batched_shapes = sorted(tuple(aval.shape) for aval, _ in batched)
    assert batched_shapes == [(), (2, 3, 8)][1 - kernel_path :], batched


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_reverse_mode_saves_the_output_where_the_default_backend_is_not_cpu(name, monkeypatch):
    # On a GPU host the kernels are eligible (it has one CPU device) but its lowering takes the
    # formulas: starting from x there would only add a recomputation of y, so the output alone is
    # saved, without the scalar that lets jit swap in the input. (Shapes of their own: traces of
    # the jitted functions are cached per shape, not per backend.)
    monkeypatch.setenv("JSOFTMAX_CPU_KERNEL", "on")
    fn = getattr(jsoftmax, name)
    cpu_x = random_logits((5, 23), seed=77)
    assert _kernel.eligible(cpu_x, (1,), None)
    on_cpu = _residuals(fn, cpu_x)
    assert sorted(aval.shape for aval, _ in on_cpu) == [(), (5, 23)], on_cpu  # the probe can fail
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    residuals = _residuals(fn, random_logits((5, 29), seed=78))
    assert [tuple(aval.shape) for aval, _ in residuals] == [(5, 29)], residuals
    assert "argument" not in residuals[0][1], residuals


@pytest.mark.parametrize("targets", ["labels", "labels-unsmoothed", "probabilities"])
def test_cross_entropy_reverse_mode_saves_no_logits_sized_array_of_its_own(targets):
    # "labels-unsmoothed": cross_entropy's own primitives (on CPU, its kernels).
    x = random_logits((3, 8), seed=34)
    labels = (
        jnp.array([1, 7, 0])
        if targets.startswith("labels")
        else jnp.asarray(np.random.default_rng(35).dirichlet(np.ones(8), 3), jnp.float32)
    )
    smoothing = 0.0 if targets == "labels-unsmoothed" else SMOOTHING

    def loss(a):
        return jsoftmax.cross_entropy(a, labels, label_smoothing=smoothing)

    residuals = _residuals(loss, x)
    logits_sized = [why for aval, why in residuals if aval.size >= x.size]
    # The logits themselves (the argument) and, for probability targets, the targets (a
    # constant here); never a probability tensor computed in the forward pass.
    assert all("argument" in why or "constant" in why for why in logits_sized), residuals
    assert any("argument" in why for why in logits_sized), residuals
    # Per-row values: one or two per row (the kernels' statistics are a [rows, 2] pair).
    per_row = [aval for aval, why in residuals if aval.size < x.size and aval.size > 1]
    assert per_row and all(aval.shape[0] == 3 and aval.size <= 6 for aval in per_row), residuals

    # The probe can fail: optax's cross-entropy saves a logits-sized array of its own.
    optax_loss = (
        (lambda a: optax.softmax_cross_entropy_with_integer_labels(a, labels).mean())
        if targets.startswith("labels")
        else (lambda a: optax.softmax_cross_entropy(a, labels).mean())
    )
    optax_residuals = _residuals(optax_loss, x)
    assert any(
        aval.size >= x.size and "argument" not in why and "constant" not in why
        for aval, why in optax_residuals
    ), optax_residuals


def _kernel_targets(compiled_text: str) -> set[str]:
    return set(re.findall(r'custom_call_target="(jsoftmax_\w+)"', compiled_text))


KERNEL_CONTEXTS = {
    "grad": lambda scalar: jax.grad(scalar),
    "grad-vmap": lambda scalar: jax.grad(lambda xs: jax.vmap(scalar)(xs).sum()),
    "grad-scan": lambda scalar: jax.grad(
        lambda xs: lax.scan(lambda c, x: (c + scalar(x), None), 0.0, xs)[0]
    ),
    "grad-checkpoint": lambda scalar: jax.grad(jax.checkpoint(scalar)),
}


@pytest.mark.parametrize("context", sorted(KERNEL_CONTEXTS))
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "where"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_reverse_mode_runs_the_cpu_backward_kernel(name, masked, context, monkeypatch):
    fn = getattr(jsoftmax, name)
    where = np.arange(8) < 6 if masked else None
    batched = context in ("grad-vmap", "grad-scan")
    x = random_logits((2, 3, 8) if batched else (3, 8), seed=36)
    cotangent = jnp.asarray(_rng_array((3, 8), 1), jnp.float32)

    def compiled_targets(mode: str) -> set[str]:
        monkeypatch.setenv("JSOFTMAX_CPU_KERNEL", mode)

        # A new function per mode: JAX caches the trace of a checkpointed function by identity,
        # and the mode is read when tracing.
        def scalar(a):
            return jnp.sum(cotangent * _finite_part(fn(a, where=where)))

        derivative = jax.jit(KERNEL_CONTEXTS[context](scalar))
        return _kernel_targets(derivative.lower(x).compile().as_text())

    # Masked calls start the backward kernel from the output; unmasked ones from the output
    # where it is used (here by _finite_part's mask), else from the input.
    backward = {f"jsoftmax_{name}_bwd"} | (set() if masked else {f"jsoftmax_{name}_bwd_from_input"})
    assert backward & compiled_targets("on")
    # The probe can fail: with the kernels off, no jsoftmax custom call is compiled.
    assert compiled_targets("off") == set()


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_reverse_mode_starts_from_the_output_where_it_is_used_else_from_the_input(name):
    # Under jit, dead-code elimination tells whether the output is used: a gradient alone runs one
    # kernel from x (no forward pass); the output and the gradient together run the forward
    # kernel and the backward one from the output (no exponentials recomputed). Eagerly the
    # saved array is the output and the backward pass reads the scalar saying so.
    fn, reference = getattr(jsoftmax, name), getattr(jax.nn, name)
    x = random_logits((6, 40), seed=91)
    g = jnp.asarray(_rng_array((6, 40), 92), jnp.float32)

    def pair(a, c):
        out, pullback = jax.vjp(fn, a)
        return out, pullback(c)[0]

    gradient_alone = jax.jit(lambda a, c: jax.vjp(fn, a)[1](c)[0])
    for jitted, expected in [
        (gradient_alone, {f"jsoftmax_{name}_bwd_from_input"}),
        (jax.jit(pair), {f"jsoftmax_{name}_fwd", f"jsoftmax_{name}_bwd"}),
    ]:
        text = jitted.lower(x, g).compile().as_text()
        assert _kernel_targets(text) == expected
        assert "conditional" not in text  # the branch not taken is compiled away
    expected_dx = jax.vjp(reference, x)[1](g)[0]
    for got in (gradient_alone(x, g), jax.jit(pair)(x, g)[1], pair(x, g)[1]):
        np.testing.assert_allclose(got, expected_dx, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(jax.jit(pair)(x, g)[0], reference(x), rtol=2e-6, atol=2e-6)
    # Forward mode with the output dead, and the input-or-output switch under vmap.
    t = jnp.asarray(_rng_array((6, 40), 93), jnp.float32)
    tangent_alone = jax.jit(lambda a, v: jax.jvp(fn, (a,), (v,))[1])
    expected_t = jax.jvp(reference, (x,), (t,))[1]
    np.testing.assert_allclose(tangent_alone(x, t), expected_t, rtol=2e-6, atol=2e-6)
    batched = jax.jit(jax.vmap(lambda a, c: jax.vjp(fn, a)[1](c)[0]))
    np.testing.assert_allclose(
        batched(jnp.stack([x, -x]), jnp.stack([g, g])),
        jnp.stack([expected_dx, jax.vjp(reference, -x)[1](g)[0]]),
        rtol=2e-6,
        atol=2e-6,
    )
    # Forward over reverse (Hessian-vector products), with the residual decided before the
    # forward pass (jax.checkpoint's rematerialised call has a dead output) and after it.
    w = jnp.asarray(_rng_array((6, 40), 94), jnp.float32)

    def hvp(f, remat, outer):
        inner = jax.checkpoint(f) if remat else f
        gradient = jax.grad(lambda a: jnp.sum(w * outer(inner(a))))
        return jax.jit(lambda a, v: jax.jvp(gradient, (a,), (v,))[1])

    for remat in (False, True):
        for outer in (jnp.tanh, lambda y: jnp.where(jnp.isfinite(y), y, 0.0)):
            np.testing.assert_allclose(
                hvp(fn, remat, outer)(x, t),
                hvp(reference, remat, outer)(x, t),
                rtol=1e-4,
                atol=1e-5,
            )


@pytest.mark.parametrize("name", NORMALIZER_NAMES)
def test_reverse_mode_transposes_the_hand_written_tangent_map(name):
    # Reverse mode is the transpose of jsoftmax's own tangent primitive, not an autodiffed formula.
    fn = getattr(jsoftmax, name)
    x = random_logits((3, 8), seed=37)
    text = str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(jnp.sin(fn(a)))))(x))
    if name == "logsumexp":
        assert "jsoftmax_normalize" in text and "jsoftmax_logsumexp" in text
    else:
        assert "jsoftmax_tangent" in text and "transposed=True" in text


@pytest.mark.parametrize("name", [*NORMALIZER_NAMES, "cross_entropy"])
def test_forward_mode_and_hessians_of_a_jitted_function_do_not_retrace(name):
    traces: list[tuple[int, ...]] = []
    labels = jnp.array([1, 0, 3])

    @jax.jit
    def f(x):
        traces.append(x.shape)
        if name == "cross_entropy":
            return jsoftmax.cross_entropy(x, labels[: x.shape[0]])
        return jnp.sum(jnp.cos(getattr(jsoftmax, name)(x)))

    x = random_logits((3, 8), seed=38)
    v = jnp.ones_like(x)
    hessian = jax.jit(jax.hessian(f))
    internal = (impl._normalize_jit, impl._logsumexp_jit, ce_impl._cross_entropy_jit)

    def run() -> None:
        jax.jvp(f, (x,), (v,))
        jax.hessian(f)(x)
        hessian(x)
        jax.jvp(jax.grad(f), (x,), (v,))

    run()
    cache_sizes = [fn._cache_size() for fn in internal]
    run()
    assert traces == [(3, 8)]
    assert [fn._cache_size() for fn in internal] == cache_sizes
    # The counter counts: a new shape is a new trace.
    jax.jvp(f, (x[:2],), (v[:2],))
    assert traces == [(3, 8), (2, 8)]


# --------------------------------------------------------------------------------------------
# jax.export: every platform, no jsoftmax-private custom call, a serialized round trip

_EXPORT_LABELS = jnp.array([2, 0, 5])
_EXPORT_TARGETS = jnp.asarray(np.random.default_rng(40).dirichlet(np.ones(6), 3), jnp.float32)
_EXPORT_MASK = np.arange(6) < 4


def _model(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A small classifier with one attention-like mixing step: every function in one graph."""
    hidden = x @ params["w_in"]
    attention = jsoftmax.softmax(hidden @ hidden.T / 2.0, where=jnp.tril(jnp.ones((3, 3), bool)))
    logits = (attention @ hidden) @ params["w_out"]
    penalty = jnp.mean(jsoftmax.logsumexp(logits)) + jnp.mean(jsoftmax.log_softmax(logits))
    return jsoftmax.cross_entropy(logits, _EXPORT_LABELS, label_smoothing=0.1) + 1e-2 * penalty


def _model_args() -> tuple[Any, ...]:
    rng = np.random.default_rng(41)
    params = {
        "w_in": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
        "w_out": jnp.asarray(rng.standard_normal((7, 6)), jnp.float32),
    }
    return params, jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)


EXPORTED = {
    "softmax": (jsoftmax.softmax, lambda: (random_logits((3, 6), seed=42),)),
    "log_softmax": (jsoftmax.log_softmax, lambda: (random_logits((3, 6), seed=42),)),
    "logsumexp": (jsoftmax.logsumexp, lambda: (random_logits((3, 6), seed=42),)),
    "softmax-where": (
        partial(jsoftmax.softmax, where=_EXPORT_MASK),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "log_softmax-where": (
        partial(jsoftmax.log_softmax, where=_EXPORT_MASK),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "logsumexp-where": (
        partial(jsoftmax.logsumexp, where=_EXPORT_MASK),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "cross_entropy-labels": (
        partial(jsoftmax.cross_entropy, labels=_EXPORT_LABELS, label_smoothing=0.1),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "cross_entropy-labels-unsmoothed": (  # the CPU kernels' case under jit
        partial(jsoftmax.cross_entropy, labels=_EXPORT_LABELS),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "cross_entropy-probabilities": (
        partial(jsoftmax.cross_entropy, labels=_EXPORT_TARGETS),
        lambda: (random_logits((3, 6), seed=42),),
    ),
    "model": (_model, _model_args),
}


def _private_custom_calls(module_text: str) -> list[str]:
    return re.findall(r"custom_call\s*@(jsoftmax\w*)", module_text) + re.findall(
        r'call_target_name\s*=\s*"(jsoftmax\w*)"', module_text
    )


def _first_scalar(fn: Callable) -> Callable:
    """A scalar of fn's output (for gradients), finite where the output is -inf."""
    return lambda *args: jnp.sum(jnp.sin(_finite_part(fn(*args))))


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_export_round_trip_carries_no_private_custom_call(name):
    fn, make_args = EXPORTED[name]
    args = make_args()
    exported = jax.export.export(jax.jit(fn))(*args)
    assert _private_custom_calls(exported.mlir_module()) == []
    restored = jax.export.deserialize(exported.serialize(vjp_order=1))
    np.testing.assert_allclose(
        to_f64(restored.call(*args)), to_f64(fn(*args)), **tolerance("float32")
    )
    # The restored artifact is differentiable (its VJP was serialized with it).
    grads = jax.grad(_first_scalar(restored.call))(*args)
    expected = jax.grad(_first_scalar(fn))(*args)
    for got_leaf, expected_leaf in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(to_f64(got_leaf), to_f64(expected_leaf), **GRAD_TOL)


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_export_of_derivatives_for_every_platform(name):
    fn, make_args = EXPORTED[name]
    args = make_args()
    scalar = _first_scalar(fn)
    for derivative in (fn, jax.grad(scalar)):
        exported = jax.export.export(jax.jit(derivative), platforms=("cpu", "cuda", "tpu"))(*args)
        assert exported.platforms == ("cpu", "cuda", "tpu")
        assert _private_custom_calls(exported.mlir_module()) == []
        restored = jax.export.deserialize(exported.serialize())
        for got_leaf, expected_leaf in zip(
            jax.tree.leaves(restored.call(*args)),
            jax.tree.leaves(derivative(*args)),
            strict=True,
        ):
            np.testing.assert_allclose(to_f64(got_leaf), to_f64(expected_leaf), **GRAD_TOL)


def test_private_custom_call_probe_detects_the_kernels():
    # The probe above can fail: the same function lowered for this CPU (not for export) calls
    # the kernels, forward and backward.
    x = random_logits((3, 6), seed=42)
    text = jax.jit(jax.grad(_first_scalar(jsoftmax.softmax))).lower(x).as_text()
    # Both backward kernels, behind a conditional on the saved scalar that XLA folds away.
    expected = {"jsoftmax_softmax_fwd", "jsoftmax_softmax_bwd", "jsoftmax_softmax_bwd_from_input"}
    assert set(_private_custom_calls(text)) == expected


# --------------------------------------------------------------------------------------------
# the semi-public rule registries jsoftmax/_primitives.py relies on (what a new JAX may change)


def test_rule_registries_jsoftmax_relies_on():
    from jax.interpreters import ad, batching, mlir

    from jsoftmax import _primitives

    primitives = (
        _primitives.normalize_p, _primitives.tangent_p, _primitives.logsumexp_p,
        _primitives.label_stats_p, _primitives.label_tangent_p, _primitives.residual_p,
    )  # fmt: skip
    for primitive in primitives:
        assert primitive in ad.primitive_jvps
    # jit's dead-code elimination consults partial_eval.dce_rules (its effect, the residual
    # swapped for the input, is pinned by
    # test_reverse_mode_starts_from_the_output_where_it_is_used_else_from_the_input).
    from jax.interpreters import partial_eval

    assert partial_eval.dce_rules[_primitives.residual_p] is _primitives._residual_dce
    # batching.primitive_batchers is write-only in jax 0.10 (a proxy that wraps the rule into
    # the private fancy_primitive_batchers): the rule is pinned by its effect instead, one
    # primitive over the batched array with the reduced axis moved up, no loop.
    batched = jax.make_jaxpr(jax.vmap(jsoftmax.softmax))(random_logits((3, 2, 6), seed=44))
    assert "jsoftmax_normalize" in str(batched) and "axes=(2,)" in str(batched)
    assert "while" not in str(batched) and "scan" not in str(batched)
    # Reverse mode is the transpose of the tangent map; the forward primitives have none (a
    # transpose rule there would mean reverse mode bypasses the tangent primitive).
    assert _primitives.tangent_p in ad.primitive_transposes
    assert _primitives.normalize_p not in ad.primitive_transposes
    assert _primitives.label_tangent_p in ad.primitive_transposes
    assert _primitives.label_stats_p not in ad.primitive_transposes
    # The helpers the rules call.
    for module, names in (
        (ad, ("Zero", "is_undefined_primal")),
        (batching, ("bdim_at_front",)),
        (mlir, ("lower_fun", "register_lowering")),
    ):
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"
    # The lowering reads for_export: True under jax.export, False under jit (the kernels'
    # presence in each is checked by the export tests above).
    seen: list[bool] = []
    original = _primitives.mlir.lower_fun

    def spying_lower_fun(fun, multiple_results):
        lowered = original(fun, multiple_results=multiple_results)

        def rule(ctx, *args):
            seen.append(ctx.module_context.lowering_parameters.for_export)
            return lowered(ctx, *args)

        return rule

    x = random_logits((2, 6), seed=43)
    _primitives.mlir.lower_fun = spying_lower_fun
    try:
        jax.jit(lambda a: jsoftmax.softmax(a) * 2).lower(x)
        jax.export.export(jax.jit(lambda a: jsoftmax.softmax(a) * 3))(x)
    finally:
        _primitives.mlir.lower_fun = original
    assert seen == [False, True]
