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


def _smoothed_labels_ref(x, aux):
    """torch's weighted, label-smoothed mean cross-entropy, written with jax.nn.log_softmax."""
    labels, weight = aux
    one_hot = jax.nn.one_hot(labels, CLASSES, dtype=x.dtype)
    label_weight = weight[labels].astype(x.dtype)
    target = (1 - SMOOTHING) * one_hot * label_weight[:, None] + SMOOTHING / CLASSES * weight
    loss = -jnp.sum(target * jax.nn.log_softmax(x, axis=-1), axis=-1)
    return jnp.sum(loss) / jnp.sum(label_weight)


def _labels_case() -> Case:
    def fn(x, aux, axis_name=None):
        labels, weight = aux
        return jsoftmax.cross_entropy(
            x, labels, weight=weight, label_smoothing=SMOOTHING, axis_name=axis_name
        )

    return Case(
        name="cross_entropy-labels",
        fn=fn,
        ref=_smoothed_labels_ref,
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
        _labels_case(),
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


def _vdot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.sum(u * v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


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

    return lambda xs: jax.shard_map(per_device, mesh=_mesh(), in_specs=P("v"), out_specs=P("v"))(
        xs
    )


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


# Outer placement only where the wrapper changes something around already transformed code:
# the batching ones (lax.map is a scan). checkpoint and cond around code that is not
# differentiated further are the identity.
PLACEMENTS = [
    pytest.param("plain", "inner", id="plain"),
    *(pytest.param(w, "inner", id=f"inner-{w}") for w in WRAPPERS if w != "plain"),
    *(pytest.param(w, "outer", id=f"outer-{w}") for w in ("vmap", "scan", "shard_map")),
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
