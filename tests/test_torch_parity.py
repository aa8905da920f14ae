"""Parity of the JAX core with torch.softmax / torch.log_softmax: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import (
    FLOAT_DTYPES,
    enable_x64,
    random_logits,
    ref_log_softmax,
    to_f64,
    tolerance,
)

import jsoftmax

PAIRS = {
    "softmax": (jsoftmax.softmax, torch.softmax),
    "log_softmax": (jsoftmax.log_softmax, torch.log_softmax),
}
CASES = [((5, 31), -1), ((5, 31), 0), ((2, 3, 17), 1), ((4,), 0), ((2, 2, 3, 9), -1)]


def _torch_value_and_grad(fn, x64: np.ndarray, dtype: str, dim: int, cotangent: np.ndarray):
    x = torch.tensor(x64, dtype=getattr(torch, dtype), requires_grad=True)
    out = fn(x, dim)
    out.backward(torch.tensor(cotangent, dtype=out.dtype))
    return to_f64(out.detach().float() if dtype == "bfloat16" else out.detach()), to_f64(
        x.grad.float() if dtype == "bfloat16" else x.grad
    )


def _ours_value_and_grad(fn, x64: np.ndarray, dtype: str, axis: int, cotangent: np.ndarray):
    x = jnp.asarray(x64).astype(dtype)
    out, vjp = jax.vjp(lambda x: fn(x, axis=axis), x)
    (grad,) = vjp(jnp.asarray(cotangent).astype(dtype))
    return to_f64(out), to_f64(grad)


def _exact(name: str, x64: np.ndarray, axis: int, cotangent: np.ndarray):
    """float64 value and gradient of the (already rounded) inputs."""
    log_probs = ref_log_softmax(x64, axis)
    probs = np.exp(log_probs)
    if name == "softmax":
        grad = probs * (cotangent - np.sum(cotangent * probs, axis, keepdims=True))
        return probs, grad
    return log_probs, cotangent - probs * np.sum(cotangent, axis, keepdims=True)


def _compare(name: str, dtype: str, x64: np.ndarray, axis: int) -> None:
    ours_fn, torch_fn = PAIRS[name]
    cotangent = np.asarray(random_logits(x64.shape, "float32", seed=99), np.float64)
    if dtype not in ("bfloat16", "float16"):
        ours = _ours_value_and_grad(ours_fn, x64, dtype, axis, cotangent)
        theirs = _torch_value_and_grad(torch_fn, x64, dtype, axis, cotangent)
        np.testing.assert_allclose(ours[0], theirs[0], **tolerance(dtype))
        np.testing.assert_allclose(ours[1], theirs[1], **tolerance(dtype, grad=True))
        return
    # Low precision: both sides see the same rounded inputs, and the float64 result of those
    # inputs is the oracle (torch's CPU f16 log_softmax is not correctly rounded, so "equal to
    # torch" would be the wrong bar).
    x64 = to_f64(jnp.asarray(x64).astype(dtype))
    cotangent = to_f64(jnp.asarray(cotangent).astype(dtype))
    ours = _ours_value_and_grad(ours_fn, x64, dtype, axis, cotangent)
    theirs = _torch_value_and_grad(torch_fn, x64, dtype, axis, cotangent)
    exact_value, exact_grad = _exact(name, x64, axis, cotangent)
    finite = np.isfinite(exact_value)
    np.testing.assert_array_equal(np.isfinite(ours[0]), finite)
    np.testing.assert_allclose(ours[0][finite], exact_value[finite], **tolerance(dtype))
    ours_err = np.max(np.abs(ours[0] - exact_value)[finite], initial=0.0)
    torch_err = np.max(np.abs(theirs[0] - exact_value)[finite], initial=0.0)
    assert ours_err <= torch_err + 1e-12, (ours_err, torch_err)
    # Both backward passes read the rounded output y; g - exp(y) * sum(g) then cancels, so the
    # error scales with sum |g| along the axis, not with the gradient itself.
    bound = 4 * float(jnp.finfo(dtype).eps) * np.sum(np.abs(cotangent), axis, keepdims=True)
    assert np.all(np.abs(ours[1] - exact_grad) <= bound)
    assert np.all(np.abs(ours[1] - theirs[1]) <= 2 * bound)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_values_and_gradients_match_torch(name, dtype, shape, axis):
    x64 = np.asarray(random_logits(shape, "float32", seed=3), np.float64)
    if dtype == "float64":
        with enable_x64():
            _compare(name, dtype, x64, axis)
    else:
        _compare(name, dtype, x64, axis)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("value", [1e30, 3e38, -1e4, -3e38, 6e4])
def test_extreme_values_match_torch(name, dtype, value):
    finfo_max = float(jnp.finfo(dtype).max)
    value = float(np.clip(value, -finfo_max, finfo_max))
    x64 = np.array([[value, 0.0, 1.0, -2.0], [value, value, 0.5, value], [0.0, 1.0, 2.0, 3.0]])
    _compare(name, dtype, x64, -1)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_where_torch_gives_nan_we_give_the_limit(name):
    """Documented differences: fully -inf rows (torch: NaN) and +inf entries (torch: NaN)."""
    ours_fn, torch_fn = PAIRS[name]
    x = np.array([[-np.inf] * 3, [np.inf, 0.0, 1.0]], np.float32)
    assert torch.isnan(torch_fn(torch.tensor(x), -1)).all()
    out = np.asarray(ours_fn(jnp.asarray(x)))
    fill = 0.0 if name == "softmax" else -np.inf
    np.testing.assert_array_equal(out[0], fill)
    np.testing.assert_array_equal(out[1], [1.0 if name == "softmax" else 0.0, fill, fill])
