"""Core softmax / log_softmax / logsumexp: values, edge cases, dtypes, errors, transforms."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import (
    enable_x64,
    np_dtype,
    random_logits,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    to_f64,
    tolerance,
)
from jax import lax
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _softmax as impl

NORMALIZERS = {
    "softmax": (jsoftmax.softmax, ref_softmax, jax.nn.softmax),
    "log_softmax": (jsoftmax.log_softmax, ref_log_softmax, jax.nn.log_softmax),
}
ALL_FUNCTIONS = {
    "softmax": jsoftmax.softmax,
    "log_softmax": jsoftmax.log_softmax,
    "logsumexp": jsoftmax.logsumexp,
}
# jax.nn's counterparts, on the last axis (jax.nn.logsumexp defaults to all axes).
JAX_NN = {
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "logsumexp": partial(jax.nn.logsumexp, axis=-1),
}


def _fill_value(name: str) -> float:
    """What a fully masked slice gives."""
    return 0.0 if name == "softmax" else -np.inf


# --------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((7,), -1),
        ((4, 33), -1),
        ((4, 33), 0),
        ((3, 5, 6), (0, 2)),
        ((2, 3, 4), None),
        ((2, 3, 4), (-1, -2)),
    ],
)
def test_values_match_float64_reference(name, dtype, shape, axis):
    fn, ref, _ = NORMALIZERS[name]
    x = random_logits(shape, dtype, seed=1)
    out = fn(x, axis=axis)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(to_f64(out), ref(x, axis), **tolerance(dtype))


def test_values_float64():
    with enable_x64():
        x = random_logits((5, 40), "float64", seed=2)
        for name, (fn, ref, _) in NORMALIZERS.items():
            out = fn(x)
            assert out.dtype == jnp.float64, name
            np.testing.assert_allclose(np.asarray(out), ref(x), **tolerance("float64"))
        lse = jsoftmax.logsumexp(x)
        np.testing.assert_allclose(np.asarray(lse), ref_logsumexp(x), **tolerance("float64"))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
def test_logsumexp_values_and_shape(axis, keepdims):
    x = random_logits((3, 4, 5), seed=3)
    out = jsoftmax.logsumexp(x, axis=axis, keepdims=keepdims)
    expected = ref_logsumexp(x, axis, keepdims=keepdims)
    assert out.shape == expected.shape
    np.testing.assert_allclose(to_f64(out), expected, **tolerance("float32"))


def test_log_softmax_keeps_digits_at_large_magnitude():
    # x - (m + log(sum)) would round m + log(sum) at ulp(1e4) ~ 1e-3 and lose ~3 digits here.
    x = jnp.array([1e4, 1e4 - 1.0, 1e4 - 2.5], jnp.float32)
    err = np.max(np.abs(to_f64(jsoftmax.log_softmax(x)) - ref_log_softmax(x)))
    assert err < 2e-7
    big = jnp.array([1e30, 0.0, -1e30], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jsoftmax.log_softmax(big)), np.array([0.0, -1e30, -2e30], np.float32)
    )


@pytest.mark.parametrize("value", [1e30, 3e38, -3e38, -1e4])
def test_extreme_values_stay_finite(value):
    x = jnp.array([[value, 0.0, 1.0], [value, value, value]], jnp.float32)
    probs = jsoftmax.softmax(x)
    assert np.all(np.isfinite(np.asarray(probs)))
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(to_f64(probs), ref_softmax(x), atol=1e-7)


# --------------------------------------------------------------------------------------------
# masking, -inf, +inf, NaN


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_where_excludes_entries(name):
    fn, ref, jax_fn = NORMALIZERS[name]
    x = random_logits((4, 6), seed=4)
    where = jnp.array([True, False, True, True, False, True])
    out = fn(x, where=where)
    np.testing.assert_allclose(to_f64(out), ref(x, -1, where), **tolerance("float32"))
    masked = np.asarray(out)[:, ~np.asarray(where)]
    assert np.all(masked == _fill_value(name))
    # Same values as jax.nn where jax.nn is defined, within float32's tolerance (jax.nn's own
    # error near 0 is a few ulps of the log-sum, larger than jsoftmax's).
    np.testing.assert_allclose(to_f64(out), to_f64(jax_fn(x, where=where)), **tolerance("float32"))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("how", ["where", "-inf"])
def test_fully_masked_slice_gives_fill_and_zero_gradient(name, how):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((3, 5), seed=5)
    if how == "where":
        where = jnp.array([[True] * 5, [False] * 5, [True, False, True, False, True]])
        call = lambda x: fn(x, where=where)  # noqa: E731
    else:
        x = x.at[1].set(-jnp.inf)
        call = fn
    out = np.asarray(call(x))
    expected_fill = -np.inf if name != "softmax" else 0.0
    assert np.all(out[1] == expected_fill)
    assert np.all(np.isfinite(out[0]))
    weights = random_logits(out.shape, seed=6)
    grad = np.asarray(
        jax.grad(lambda x: jnp.sum(jnp.where(jnp.isinf(call(x)), 0, call(x)) * weights))(x)
    )
    assert not np.any(np.isnan(grad))
    np.testing.assert_array_equal(grad[1], 0.0)


def test_where_masked_gradient_is_zero_even_for_nan_cotangent():
    # The `where(mask, log(p), 0)` trap sends NaN cotangents to masked positions; with an explicit
    # mask they must not reach the gradient (as in jax.nn with where=).
    x = random_logits((2, 3), seed=30)
    where = jnp.array([[True, True, False], [False, False, False]])
    clean = jnp.array([[0.5, -1.5, 0.0], [0.0, 0.0, 0.0]])
    poisoned = clean.at[0, 2].set(jnp.nan).at[1].set(jnp.inf)
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        _, vjp = jax.vjp(lambda x, fn=fn: fn(x, where=where), x)
        (grad,) = vjp(poisoned)
        np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(where)], 0.0)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(vjp(clean)[0]))


def test_minus_inf_gradient_with_finite_and_nonfinite_cotangents():
    x = jnp.full((2, 3), -jnp.inf).at[0].set(jnp.array([1.0, 2.0, 3.0]))
    finite = random_logits((2, 3), seed=31)
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        _, vjp = jax.vjp(fn, x)
        np.testing.assert_array_equal(np.asarray(vjp(finite)[0])[1], 0.0)
    # log_softmax isolates -inf positions from any cotangent; softmax without `where` keeps the
    # single-pass backward of jax.nn and lets a NaN cotangent there reach its own row only.
    nan_row = jnp.ones((2, 3)).at[1].set(jnp.nan)
    _, vjp = jax.vjp(jsoftmax.log_softmax, x)
    np.testing.assert_array_equal(np.asarray(vjp(nan_row)[0])[1], 0.0)
    _, vjp = jax.vjp(jsoftmax.softmax, x)
    grad = np.asarray(vjp(nan_row)[0])
    assert np.all(np.isfinite(grad[0]))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e38])
def test_masked_values_never_leak(name, bad):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((3, 4), seed=7)
    where = jnp.array([True, True, False, True])
    clean = fn(x, where=where)
    poisoned_x = x.at[:, 2].set(bad)
    poisoned = fn(poisoned_x, where=where)
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))

    def loss(x):
        out = fn(x, where=where)
        return jnp.sum(jnp.where(jnp.isinf(out), 0, out))

    grad = np.asarray(jax.grad(loss)(poisoned_x))
    np.testing.assert_array_equal(grad[:, 2], 0.0)
    np.testing.assert_allclose(grad, np.asarray(jax.grad(loss)(x)), rtol=1e-6, atol=1e-7)


def test_large_masked_logits_under_vmap_get_exactly_zero_gradient():
    x = random_logits((6, 8), seed=8).at[:, -3:].set(1e30)
    where = jnp.arange(8) < 5

    def row_loss(row):
        return jnp.sum(jsoftmax.softmax(row, where=where) * jnp.arange(8.0))

    grads = np.asarray(jax.vmap(jax.grad(row_loss))(x))
    np.testing.assert_array_equal(grads[:, -3:], 0.0)
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_nan_stays_in_its_slice(name):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((3, 4), seed=9).at[1, 2].set(jnp.nan)
    out = np.asarray(fn(x))
    assert np.all(np.isnan(out[1]))
    assert not np.any(np.isnan(out[[0, 2]]))
    grad = np.asarray(jax.grad(lambda x: jnp.sum(fn(x)[0]))(x))
    assert not np.any(np.isnan(grad[[0, 2]]))


def test_positive_inf_wins_its_slice():
    x = jnp.array([[jnp.inf, 1.0, jnp.inf, -jnp.inf], [jnp.inf, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(
        np.asarray(jsoftmax.softmax(x)), [[0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]
    )
    np.testing.assert_array_equal(
        np.asarray(jsoftmax.log_softmax(x)),
        [
            [-np.log(np.float32(2)), -np.inf, -np.log(np.float32(2)), -np.inf],
            [0, -np.inf, -np.inf, -np.inf],
        ],
    )
    np.testing.assert_array_equal(np.asarray(jsoftmax.logsumexp(x)), [np.inf, np.inf])
    # A +inf at a masked position does not count.
    where = jnp.array([False, True, True, True])
    np.testing.assert_allclose(
        np.asarray(jsoftmax.softmax(x[1], where=where)), [0, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("in_dtype", ["int32", "int8", "uint8", "bool"])
def test_integer_and_bool_inputs_promote_to_default_float(name, in_dtype):
    x = jnp.arange(6).reshape(2, 3).astype(in_dtype)
    out = ALL_FUNCTIONS[name](x)
    assert out.dtype == jnp.float32
    expected = ALL_FUNCTIONS[name](x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_argument_casts_input_first(name, dtype):
    x = random_logits((3, 7), "float32", seed=10)
    out = ALL_FUNCTIONS[name](x, dtype=dtype)
    assert out.dtype == np_dtype(dtype)
    expected = ALL_FUNCTIONS[name](x.astype(dtype))
    np.testing.assert_array_equal(to_f64(out), to_f64(expected))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.int32, "bool", "complex64", "not-a-dtype"])
def test_non_floating_dtype_argument_is_a_type_error(name, dtype):
    with pytest.raises(TypeError, match=rf"{name}: dtype expected a floating dtype"):
        ALL_FUNCTIONS[name](jnp.ones(3), dtype=dtype)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_complex_input_is_a_type_error(name):
    with pytest.raises(TypeError, match=rf"{name}: x expected a real array, got dtype complex64"):
        ALL_FUNCTIONS[name](jnp.ones(3, jnp.complex64))


def _rounding_errors(dtype: str, name: str) -> dict[str, float]:
    """Norm-wise relative error of each contender against float64, and the rounding floor."""
    fn, ref, jax_fn = NORMALIZERS[name]
    x = random_logits((64, 2048), "float32", seed=11).astype(dtype)
    exact = ref(x)
    finite = np.isfinite(exact)
    floor_values = to_f64(np.asarray(exact).astype(np_dtype(dtype)))

    def error(values):
        diff = np.abs(to_f64(values) - exact)[finite]
        return float(np.sum(diff) / np.sum(np.abs(exact[finite])))

    return {"floor": error(floor_values), "jsoftmax": error(fn(x)), "jax.nn": error(jax_fn(x))}


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_is_correctly_rounded(name, dtype):
    errors = _rounding_errors(dtype, name)
    assert errors["jsoftmax"] <= 1.05 * errors["floor"], errors


def test_float16_long_rows_accumulate_in_float32():
    n = 70_000  # more than f16's max (65504): an f16 sum would overflow
    x = jnp.zeros((n,), jnp.float16)
    probs = jsoftmax.softmax(x)
    assert probs.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(probs), np.float16(1.0 / n))
    np.testing.assert_array_equal(np.asarray(jsoftmax.log_softmax(x)), np.float16(-np.log(n)))
    assert np.asarray(jsoftmax.logsumexp(x)) == np.float16(np.log(n))


# --------------------------------------------------------------------------------------------
# shapes, axes, errors


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize(
    ("shape", "axis"), [((0,), -1), ((3, 0), -1), ((0, 4), -1), ((2, 0, 3), (1, 2))]
)
def test_empty_arrays(name, shape, axis):
    x = jnp.zeros(shape)
    out = ALL_FUNCTIONS[name](x, axis=axis)
    expected_shape = ref_logsumexp(np.zeros(shape), axis).shape if name == "logsumexp" else shape
    assert out.shape == expected_shape
    if name == "logsumexp" and out.size:
        assert np.all(np.asarray(out) == -np.inf)  # log of an empty sum


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_equivalent_axis_spellings_agree(name):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((2, 3, 4), seed=12)
    np.testing.assert_array_equal(np.asarray(fn(x, axis=-1)), np.asarray(fn(x, axis=2)))
    np.testing.assert_array_equal(np.asarray(fn(x, axis=(0, -1))), np.asarray(fn(x, axis=[2, 0])))
    np.testing.assert_array_equal(np.asarray(fn(x, axis=None)), np.asarray(fn(x, axis=(0, 1, 2))))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(name, axis):
    with pytest.raises(ValueError, match=rf"{name}: axis expected .* rank 2, got"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), axis=axis)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_axis_duplicated(name):
    with pytest.raises(ValueError, match=rf"{name}: axis expected distinct axes .* rank 2"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), axis=(1, -1))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("axis", [1.0, "0", True, (0, None)])
def test_axis_of_wrong_kind(name, axis):
    ALL_FUNCTIONS[name](jnp.ones((2, 3)), axis=1)  # a valid call with an equal-hashing axis first
    with pytest.raises(TypeError, match=rf"{name}: axis expected an int or a tuple of ints"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), axis=axis)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("bad", ["abc", [1.0, 2.0], None, {"a": 1}])
def test_non_array_input_is_a_type_error(name, bad):
    with pytest.raises(TypeError, match=rf"{name}: x expected a jax.Array, numpy array or scalar"):
        ALL_FUNCTIONS[name](bad)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_where_shape_that_does_not_broadcast(name):
    with pytest.raises(ValueError, match=r"where expected .* \(2, 3\), got \(2,\)"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), where=jnp.ones(2, bool))
    with pytest.raises(ValueError, match=r"where expected .* \(2, 3\), got \(4, 2, 3\)"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), where=jnp.ones((4, 2, 3), bool))


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_where_must_be_boolean(name):
    with pytest.raises(TypeError, match=rf"{name}: where expected a boolean array, got dtype"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), where=jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=rf"{name}: where expected a boolean array, got list"):
        ALL_FUNCTIONS[name](jnp.ones((2, 3)), where=[True, False, True])


def test_keepdims_must_be_bool():
    with pytest.raises(TypeError, match="logsumexp: keepdims expected a bool"):
        jsoftmax.logsumexp(jnp.ones(3), keepdims="yes")


def test_numpy_and_scalar_inputs():
    x = np.array([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(np.asarray(jsoftmax.softmax(x)), ref_softmax(x), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jsoftmax.softmax(2.0, axis=None)), 1.0)
    with pytest.raises(ValueError, match=r"softmax: axis expected .* rank 0"):
        jsoftmax.softmax(2.0)


# --------------------------------------------------------------------------------------------
# differentiation


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_jax_nn(name, masked):
    x = random_logits((4, 9), seed=13)
    where = (jnp.arange(9) % 3 != 0) if masked else None
    jax_fns = JAX_NN
    weights = random_logits((4, 9) if name != "logsumexp" else (4,), seed=14)

    def loss(fn):
        def inner(x):
            out = fn(x, where=where)
            return jnp.sum(jnp.where(jnp.isfinite(out), out, 0) * weights)

        return inner

    ours = jax.grad(loss(ALL_FUNCTIONS[name]))(x)
    theirs = jax.grad(loss(jax_fns[name]))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_second_order_reverse_mode(name):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((2, 5), seed=15)
    check_grads(lambda x: fn(x), (x,), order=2, modes=["rev"], atol=5e-2, rtol=5e-2)
    with enable_x64():
        x64 = random_logits((2, 5), "float64", seed=15)
        check_grads(lambda x: fn(x), (x64,), order=2, modes=["rev"])


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_reverse_over_reverse_hessian_matches_jax_nn(name):
    jax_fns = JAX_NN
    x = random_logits((6,), seed=16)
    ours = jax.jacrev(jax.jacrev(ALL_FUNCTIONS[name]))(x)
    theirs = jax.jacrev(jax.jacrev(jax_fns[name]))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    # grad-of-grad as well, through a scalar
    g2 = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(ALL_FUNCTIONS[name](x) ** 2))(x)))
    g2_ref = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jax_fns[name](x) ** 2))(x)))
    # The exact value is 0 (shift invariance): a cancellation of inner-gradient terms up to ~40
    # here, whose float32 ulp is 3.8e-6, so both results are zero to within an ulp of those terms.
    np.testing.assert_allclose(np.asarray(g2(x)), np.asarray(g2_ref(x)), rtol=1e-5, atol=4e-6)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize("masked", [False, True])
def test_saves_exactly_one_residual(name, masked):
    from jax._src.ad_checkpoint import saved_residuals  # the utility behind print_saved_residuals

    x = random_logits((3, 8), seed=18)
    where = jnp.arange(8) < 6 if masked else None
    residuals = saved_residuals(lambda x: ALL_FUNCTIONS[name](x, where=where), x)
    # One array; on the CPU kernel path (unmasked float32) also the int32 scalar that says whether
    # it is the output or the input (test_transformations pins when).
    shapes = [tuple(aval.shape) for aval, _ in residuals if aval.shape != ()]
    scalars = [aval.dtype for aval, _ in residuals if aval.shape == ()]
    assert shapes == [(3, 8)], residuals
    assert scalars in ([], [jnp.dtype(jnp.int32)]), residuals


def test_residual_probe_detects_extra_residuals():
    # The probe above can fail: an autodiffed formula saves more than one array.
    from jax._src.ad_checkpoint import saved_residuals

    residuals = saved_residuals(lambda x: jax.nn.log_softmax(jnp.sin(x)), random_logits((3, 8)))
    assert len(residuals) > 1


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_sum_to_zero_along_axis(name, dtype):
    x = random_logits((5, 12), dtype, seed=19)
    cotangent = random_logits((5, 12), dtype, seed=20)
    _, vjp = jax.vjp(NORMALIZERS[name][0], x)
    (grad,) = vjp(cotangent)
    assert grad.dtype == x.dtype
    np.testing.assert_allclose(to_f64(grad).sum(-1), 0.0, atol=2e-5 if dtype == "float32" else 0.2)


# --------------------------------------------------------------------------------------------
# transformations


@pytest.mark.parametrize(
    ("name", "jitted"),
    [
        ("softmax", impl._normalize_jit),
        ("log_softmax", impl._normalize_jit),
        ("logsumexp", impl._logsumexp_jit),
    ],
)
def test_repeated_calls_do_not_retrace(name, jitted):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((3, 17, 5), seed=21)
    fn(x, axis=1)
    size = jitted._cache_size()
    for axis in (1, -2, (1,), [-2]):
        fn(x + 1.0, axis=axis)
    assert jitted._cache_size() == size
    fn(x, axis=0)  # and the counter does move for a genuinely new call
    assert jitted._cache_size() == size + 1


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_composes_with_vmap_scan_checkpoint_and_jit(name):
    fn = ALL_FUNCTIONS[name]
    x = random_logits((4, 3, 6), seed=22)
    direct = np.asarray(fn(x))
    np.testing.assert_allclose(np.asarray(jax.vmap(fn)(x)), direct, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x)), direct, rtol=1e-6)

    def step(carry, row):
        return carry + jnp.sum(fn(row)), fn(row)

    total, stacked = lax.scan(step, 0.0, x)
    np.testing.assert_allclose(np.asarray(stacked), direct, rtol=1e-6)
    np.testing.assert_allclose(float(total), float(np.sum(direct)), rtol=1e-5)

    def loss(x):
        out = jax.checkpoint(fn)(x)
        return jnp.sum(out * jnp.cos(out))

    np.testing.assert_allclose(
        np.asarray(jax.grad(loss)(x)),
        np.asarray(jax.grad(lambda x: jnp.sum(fn(x) * jnp.cos(fn(x))))(x)),
        rtol=1e-5,
        atol=1e-6,
    )
    per_example = jax.vmap(jax.grad(lambda row: jnp.sum(fn(row) ** 2)))(x)
    batched = jax.grad(lambda x: jnp.sum(fn(x) ** 2))(x)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), rtol=1e-5, atol=1e-7)


def test_vmap_over_mask():
    x = random_logits((3, 5), seed=23)
    masks = jnp.array([[True] * 5, [False] * 5, [True, False] * 2 + [True]])
    out = jax.vmap(lambda row, m: jsoftmax.softmax(row, where=m))(x, masks)
    np.testing.assert_allclose(to_f64(out), ref_softmax(x, -1, masks), atol=1e-7)


# --------------------------------------------------------------------------------------------
# logsumexp's jax.scipy arguments


@pytest.mark.parametrize("return_sign", [False, True])
def test_logsumexp_b_and_return_sign_match_jax_scipy(return_sign):
    x = random_logits((4, 6), seed=60)
    b = jnp.asarray(np.random.default_rng(61).standard_normal((4, 6)), jnp.float32).at[0, 2].set(0)
    ours = jsoftmax.logsumexp(x, b=b, return_sign=return_sign)
    theirs = jax.scipy.special.logsumexp(x, axis=-1, b=b, return_sign=return_sign)
    for mine, reference in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(reference), rtol=1e-6)

    def value(x, b):
        return jnp.sum(jsoftmax.logsumexp(x, b=b, return_sign=True)[0])

    def reference_value(x, b):
        return jnp.sum(jax.scipy.special.logsumexp(x, axis=-1, b=b, return_sign=True)[0])

    for argnum in (0, 1):
        np.testing.assert_allclose(
            np.asarray(jax.grad(value, argnum)(x, b)),
            np.asarray(jax.grad(reference_value, argnum)(x, b)),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip


def test_logsumexp_b_keeps_the_masking_rules():
    x = jnp.array([[0.0, 1.0], [-jnp.inf, -jnp.inf], [jnp.inf, 0.0]])
    value, sign = jsoftmax.logsumexp(x, b=jnp.array([2.0, 1.0]), return_sign=True)
    np.testing.assert_allclose(float(value[0]), np.log(2 + np.e), rtol=1e-6)
    assert float(value[1]) == -np.inf and float(sign[1]) == 0.0
    assert float(value[2]) == np.inf and float(sign[2]) == 1.0
    grad = jax.grad(lambda x: jsoftmax.logsumexp(x[1:2], b=jnp.array([2.0, 1.0])).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)  # an empty slice: gradient 0, not NaN


def test_logsumexp_b_errors_name_the_argument():
    with pytest.raises(ValueError, match="logsumexp: b expected a shape that broadcasts"):
        jsoftmax.logsumexp(jnp.ones((2, 3)), b=jnp.ones(4))
    with pytest.raises(TypeError, match="logsumexp: return_sign expected a bool"):
        jsoftmax.logsumexp(jnp.ones(3), return_sign=1)
