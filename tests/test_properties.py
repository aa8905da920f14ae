"""Property tests (hypothesis, deterministic): invariants softmax users rely on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jsoftmax

# Deterministic: the same examples every run; few shapes so jit compiles stay bounded.
PROFILE = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SHAPES = [(1, 1), (3, 7), (2, 64)]
finite = st.floats(-80.0, 80.0, allow_nan=False, width=32)


@st.composite
def logits(draw):
    shape = draw(st.sampled_from(SHAPES))
    values = draw(st.lists(finite, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return jnp.asarray(np.array(values, np.float32).reshape(shape))


@PROFILE
@given(logits())
def test_rows_sum_to_one(x):
    probs = np.asarray(jsoftmax.softmax(x), np.float64)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=2e-6)


@PROFILE
@given(logits(), st.floats(-1e3, 1e3, width=32))
def test_shift_invariance(x, shift):
    shifted = x + jnp.float32(shift)
    np.testing.assert_allclose(
        np.asarray(jsoftmax.softmax(shifted)), np.asarray(jsoftmax.softmax(x)), atol=5e-5
    )


@PROFILE
@given(logits())
def test_exp_log_softmax_is_softmax(x):
    np.testing.assert_allclose(
        np.exp(np.asarray(jsoftmax.log_softmax(x), np.float64)),
        np.asarray(jsoftmax.softmax(x), np.float64),
        rtol=1e-5,
        atol=1e-7,
    )


@PROFILE
@given(logits(), st.integers(0, 2**31 - 1))
def test_gradients_sum_to_zero_along_axis(x, seed):
    cotangent = jax.random.normal(jax.random.key(seed), x.shape)
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        _, vjp = jax.vjp(fn, x)
        (grad,) = vjp(cotangent)
        scale = 1.0 + float(jnp.max(jnp.abs(cotangent))) * x.shape[-1]
        np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=2e-6 * scale)


@PROFILE
@given(logits())
def test_logsumexp_is_consistent_with_log_softmax(x):
    lse = np.asarray(jsoftmax.logsumexp(x, keepdims=True), np.float64)
    recovered = np.asarray(jsoftmax.log_softmax(x), np.float64) + lse
    np.testing.assert_allclose(
        recovered, np.asarray(x, np.float64), atol=2e-6 * (1 + float(np.max(np.abs(lse))))
    )
