"""The torch-facing softmax / log_softmax and their modules: parity with torch, autograd, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import ref_log_softmax, tolerance

from jsoftmax import interop
from jsoftmax.interop import _convert, _ops

FUNCTIONS = {
    "softmax": (interop.softmax, torch.softmax),
    "log_softmax": (interop.log_softmax, torch.log_softmax),
}
MODULES = {
    "softmax": (interop.Softmax, torch.nn.Softmax),
    "log_softmax": (interop.LogSoftmax, torch.nn.LogSoftmax),
}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHAPES_AND_DIMS = [((7,), 0), ((5, 13), 1), ((5, 13), 0), ((2, 3, 9), -1), ((2, 3, 9), 1)]


def _f64(tensor: torch.Tensor) -> np.ndarray:
    """Any floating tensor (bf16 included) as a float64 numpy array."""
    return tensor.detach().double().numpy()


def _leaf(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def _value_and_grad(fn, x: torch.Tensor, dim: int, cotangent: torch.Tensor, **kwargs):
    out = fn(x, dim, **kwargs)
    out.backward(cotangent)
    return out.detach(), x.grad


def _exact(name: str, x64: np.ndarray, dim: int, cotangent: np.ndarray):
    """float64 value and gradient at the (already rounded) inputs."""
    log_probs = ref_log_softmax(x64, dim)
    probs = np.exp(log_probs)
    if name == "softmax":
        return probs, probs * (cotangent - np.sum(cotangent * probs, dim, keepdims=True))
    return log_probs, cotangent - probs * np.sum(cotangent, dim, keepdims=True)


def _logits(shape, seed=0, scale=3.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


# --------------------------------------------------------------------------------------------
# parity with torch and with the float64 reference


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@pytest.mark.parametrize(("shape", "dim"), SHAPES_AND_DIMS)
def test_values_and_gradients_match_torch(name, dtype, shape, dim):
    ours_fn, torch_fn = FUNCTIONS[name]
    torch_dtype = TORCH_DTYPES[dtype]
    logits, cotangent = _logits(shape), _logits(shape, seed=1)
    ours = _value_and_grad(
        ours_fn, _leaf(logits, torch_dtype), dim, torch.tensor(cotangent, dtype=torch_dtype)
    )
    theirs = _value_and_grad(
        torch_fn, _leaf(logits, torch_dtype), dim, torch.tensor(cotangent, dtype=torch_dtype)
    )
    for mine, torchs in zip(ours, theirs, strict=True):
        assert mine.dtype == torchs.dtype and mine.shape == torchs.shape
    # torch's CPU bf16/f16 kernels land a few ulps off the float64 answer, so agreement with
    # torch is checked at the gradient tolerance there; the float64 oracle below stays tight.
    low_precision = dtype in ("bfloat16", "float16")
    np.testing.assert_allclose(
        _f64(ours[0]), _f64(theirs[0]), **tolerance(dtype, grad=low_precision)
    )
    np.testing.assert_allclose(_f64(ours[1]), _f64(theirs[1]), **tolerance(dtype, grad=True))
    # And against float64 at the rounded inputs, where torch is only a peer.
    rounded = _f64(torch.tensor(logits, dtype=torch_dtype))
    rounded_cotangent = _f64(torch.tensor(cotangent, dtype=torch_dtype))
    value, grad = _exact(name, rounded, dim, rounded_cotangent)
    np.testing.assert_allclose(_f64(ours[0]), value, **tolerance(dtype))
    np.testing.assert_allclose(_f64(ours[1]), grad, **tolerance(dtype, grad=True))


EXTREME_ROWS = {
    "wide_range": [1e4, -1e4, 0.0, 5.0],
    "all_equal_huge_negative": [-1e30, -1e30, -1e30, -1e30],
    "near_exp_overflow": [88.0, 89.0, 90.0, -200.0],
    "float32_limits": [3e38, -3e38, 3e38, 0.0],
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("row", sorted(EXTREME_ROWS))
def test_extreme_finite_rows_match_torch(name, row):
    ours_fn, torch_fn = FUNCTIONS[name]
    cotangent = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = np.array([EXTREME_ROWS[row]])
    ours = _value_and_grad(ours_fn, _leaf(values, torch.float32), 1, cotangent)
    theirs = _value_and_grad(torch_fn, _leaf(values, torch.float32), 1, cotangent)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-6, atol=3e-7)
    if name == "log_softmax" and row == "float32_limits":
        # -3e38 - 3e38 overflows to a -inf output, which the core's backward rule treats as a
        # masked entry (documented): gradient exactly 0 there, where torch (and float64) keep
        # its cotangent. Pin that behaviour; the other entries still match torch.
        # The rule in float64: drop the cotangent at the -inf output, then g - p * sum(g).
        kept_cotangent = cotangent.double().numpy() * np.array([[1.0, 0.0, 1.0, 1.0]])
        probs = np.array([[0.5, 0.0, 0.5, 0.0]])  # exact: exp(-3e38 - log 2) is 0 in float64 too
        expected = kept_cotangent - probs * kept_cotangent.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(_f64(ours[1]), expected, rtol=2e-6, atol=1e-7)
        assert not np.allclose(_f64(theirs[1]), expected)  # torch keeps that cotangent
        return
    torch.testing.assert_close(ours[1], theirs[1], rtol=2e-5, atol=3e-6)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_minus_inf_entries_are_masked(name):
    # jsoftmax treats -inf entries as masked: probability 0 / log-probability -inf, gradient 0,
    # and their cotangent never reaches the rest of the row (torch lets it through).
    ours_fn, _ = FUNCTIONS[name]
    x = _leaf(np.array([[-np.inf, 0.0, 1.0, -np.inf]]), torch.float32)
    cotangent = np.array([[0.5, -1.0, 2.0, 0.25]])
    out, grad = _value_and_grad(ours_fn, x, 1, torch.tensor(cotangent, dtype=torch.float32))
    kept = np.array([[False, True, True, False]])
    masked_cotangent = np.where(kept, cotangent, 0.0)
    value, expected_grad = _exact(
        name, np.array([[-np.inf, 0.0, 1.0, -np.inf]]), 1, masked_cotangent
    )
    np.testing.assert_allclose(_f64(out), value, **tolerance("float32"))
    np.testing.assert_allclose(
        _f64(grad), np.where(kept, expected_grad, 0.0), **tolerance("float32", grad=True)
    )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_rows_torch_gets_wrong_are_right_and_stay_in_their_row(name):
    # An all -inf row is a fully masked slice (torch: NaN); a +inf entry wins its row (torch:
    # NaN). The finite row must be untouched and every gradient finite.
    ours_fn, _ = FUNCTIONS[name]
    x = _leaf(np.array([[-np.inf] * 3, [0.0, np.inf, 1.0], [1.0, 2.0, 3.0]]), torch.float32)
    out = ours_fn(x, 1)
    out[torch.isfinite(out)].sum().backward()
    expected_masked = 0.0 if name == "softmax" else -np.inf
    np.testing.assert_array_equal(out[0].detach().numpy(), [expected_masked] * 3)
    if name == "softmax":
        np.testing.assert_array_equal(out[1].detach().numpy(), [0.0, 1.0, 0.0])
    else:
        np.testing.assert_array_equal(out[1].detach().numpy(), [-np.inf, 0.0, -np.inf])
    finite_row = ref_log_softmax(np.array([1.0, 2.0, 3.0]), 0)
    expected_row = finite_row if name == "log_softmax" else np.exp(finite_row)
    np.testing.assert_allclose(_f64(out[2]), expected_row, **tolerance("float32"))
    assert torch.isfinite(x.grad).all()
    np.testing.assert_array_equal(x.grad[:2].numpy(), np.zeros((2, 3)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_dtype_argument_casts_first_as_torch_does(name):
    ours_fn, torch_fn = FUNCTIONS[name]
    logits, cotangent = (
        _logits((3, 10)),
        torch.tensor(_logits((3, 10), seed=1), dtype=torch.float32),
    )
    ours = _value_and_grad(ours_fn, _leaf(logits, torch.float16), 1, cotangent, dtype=torch.float32)
    theirs = _value_and_grad(
        torch_fn, _leaf(logits, torch.float16), 1, cotangent, dtype=torch.float32
    )
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float16
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_float64_is_computed_in_float64_whatever_jax_x64_says(name):
    import jax

    ours_fn, torch_fn = FUNCTIONS[name]
    x = torch.tensor([[0.0, 1e-12, 2e-12]], dtype=torch.float64)
    with jax.enable_x64(False):
        out = ours_fn(x, 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch_fn(x, 1), rtol=1e-15, atol=1e-16)


# --------------------------------------------------------------------------------------------
# shapes and layouts


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dim", [0, -1])
def test_zero_dim_tensor_as_torch(name, dim):
    ours_fn, torch_fn = FUNCTIONS[name]
    ours = _value_and_grad(ours_fn, _leaf(np.array(1.5), torch.float32), dim, torch.tensor(2.0))
    theirs = _value_and_grad(torch_fn, _leaf(np.array(1.5), torch.float32), dim, torch.tensor(2.0))
    assert ours[0].shape == torch.Size([])
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(("shape", "dim"), [((0, 4), 1), ((3, 0), 1), ((3, 0), 0)])
def test_zero_size_as_torch(name, shape, dim):
    ours_fn, torch_fn = FUNCTIONS[name]
    x = torch.zeros(shape, requires_grad=True)
    out = ours_fn(x, dim)
    assert out.shape == torch_fn(x, dim).shape and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape


NON_CONTIGUOUS = {
    "transposed": lambda t: t.t(),
    "step_slice": lambda t: t[::2],
    "column_slice": lambda t: t[:, 1:5],
    "expanded": lambda t: t[:1].expand(6, 8),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("layout", sorted(NON_CONTIGUOUS))
@pytest.mark.parametrize("dim", [0, 1])
def test_non_contiguous_inputs(name, layout, dim):
    ours_fn, torch_fn = FUNCTIONS[name]
    logits = _logits((6, 8))
    results = []
    for fn in (ours_fn, torch_fn):
        leaf = _leaf(logits, torch.float32)
        view = NON_CONTIGUOUS[layout](leaf)
        out = fn(view, dim)
        out.backward(torch.ones_like(out) * torch.arange(out.shape[1]))
        results.append((out.detach(), leaf.grad))
    assert results[0][0].is_contiguous()
    torch.testing.assert_close(results[0], results[1], rtol=2e-6, atol=3e-6)


def test_no_copies_in_either_pass(monkeypatch):
    # Dense and permuted inputs, and the expanded gradient of out.sum(), cross both ways
    # without a single copy: every copy the bridge makes goes through _dense_copy.
    copies = []
    original = _convert._dense_copy

    def counting_copy(tensor):
        copies.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(_convert, "_dense_copy", counting_copy)
    for view in (lambda t: t, lambda t: t.t(), lambda t: t.permute(1, 0)):
        for loss in (torch.sum, lambda out: (out * 2).sum()):
            leaf = _leaf(_logits((4, 6)), torch.float32)
            loss(interop.softmax(view(leaf), 1)).backward()
            assert leaf.grad is not None
    assert copies == []
    # The counter does see copies where they are needed.
    interop.softmax(_leaf(_logits((4, 6)), torch.float32)[:, ::2], 1)
    assert copies == [(4, 3)]


# --------------------------------------------------------------------------------------------
# autograd: gradcheck in float64, second derivatives, modes


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(("shape", "dim"), [((3, 5), 1), ((3, 5), 0), ((2, 3, 4), 1)])
def test_gradcheck_and_gradgradcheck_float64(name, shape, dim):
    ours_fn, _ = FUNCTIONS[name]
    x = _leaf(_logits(shape, scale=1.0), torch.float64)
    assert torch.autograd.gradcheck(lambda t: ours_fn(t, dim), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ours_fn(t, dim), (x,))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_second_derivatives_match_torch(name):
    ours_fn, torch_fn = FUNCTIONS[name]
    weights = torch.tensor(_logits((3, 5), seed=2), dtype=torch.float64)
    hessian_vector = []
    for fn in (ours_fn, torch_fn):
        x = _leaf(_logits((3, 5), scale=1.0), torch.float64)
        (grad,) = torch.autograd.grad((fn(x, 1) * weights).sum(), x, create_graph=True)
        (grad_of_grad,) = torch.autograd.grad((grad * weights).sum(), x)
        hessian_vector.append(grad_of_grad)
    torch.testing.assert_close(hessian_vector[0], hessian_vector[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("log", [False, True])
def test_the_custom_op_route_has_the_same_derivatives(log):
    # Eager calls take a shorter route (an autograd.Function); torch.compile and other tracers
    # record the custom op. Both must give exact first and second derivatives.
    x = _leaf(_logits((3, 5), scale=1.0), torch.float64)
    assert torch.autograd.gradcheck(lambda t: _ops._softmax_op(t, 1, log), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _ops._softmax_op(t, 1, log), (x,))
    eager = (interop.log_softmax if log else interop.softmax)(x, 1)
    assert eager.grad_fn is not None and type(eager.grad_fn).__name__ == "_SoftmaxBackward"
    torch.testing.assert_close(eager, _ops._softmax_op(x, 1, log), rtol=0, atol=0)


def test_third_derivative_raises_clearly():
    x = _leaf(_logits((2, 3), scale=1.0), torch.float64)
    (grad,) = torch.autograd.grad(interop.softmax(x, 1)[:, 0].sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad(grad[:, 1].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="order three and above are not implemented"):
        torch.autograd.grad(grad2.sum(), x)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_under_no_grad(name):
    ours_fn, torch_fn = FUNCTIONS[name]
    x = _leaf(_logits((3, 4)), torch.float32)
    with torch.no_grad():
        out = ours_fn(x, 1)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch_fn(x, 1).detach())


# --------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_train_to_the_same_gradients_as_torch(name):
    ours_module, torch_module = MODULES[name]
    models = []
    for module in (ours_module, torch_module):
        torch.manual_seed(0)
        models.append(
            torch.nn.Sequential(
                torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), module(dim=1)
            )
        )
    assert repr(models[0][-1]) == f"{ours_module.__name__}(dim=1)"
    inputs = torch.tensor(_logits((8, 6), seed=3, scale=1.0), dtype=torch.float32)
    targets = torch.tensor(_logits((8, 4), seed=4, scale=1.0), dtype=torch.float32)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    for _ in range(3):
        grads = []
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            ((model(inputs) - targets) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        for ours, theirs in zip(*grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", [interop.Softmax, interop.LogSoftmax])
def test_module_dim_must_be_an_int(module):
    with pytest.raises(TypeError, match=f"{module.__name__}: dim expected an int, got 'x'"):
        module(dim="x")
    with pytest.raises(IndexError, match=r"dim expected an int in \[-2, 1\] .* got 2"):
        module(dim=2)(torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    ("shape", "dim", "bounds"),
    [((2, 3), 2, "[-2, 1]"), ((2, 3), -3, "[-2, 1]"), ((), 1, "[-1, 0]")],
)
def test_dim_out_of_range_is_an_index_error(name, shape, dim, bounds):
    ours_fn, torch_fn = FUNCTIONS[name]
    with pytest.raises(IndexError):  # torch's own behaviour, which we follow
        torch_fn(torch.zeros(shape), dim)
    with pytest.raises(IndexError, match=rf"{name}: dim expected an int in \{bounds[:-1]}\]"):
        ours_fn(torch.zeros(shape), dim)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros(3), 0), {}, "input expected a torch.Tensor, got ndarray"),
        ((torch.zeros(3, dtype=torch.int64), 0), {}, "input expected a floating tensor.*int64"),
        ((torch.zeros(3, dtype=torch.complex64), 0), {}, "input expected a floating tensor"),
        ((torch.zeros(3), 0.5), {}, "dim expected an int, got 0.5"),
        ((torch.zeros(3), True), {}, "dim expected an int, got True"),
        ((torch.zeros(3), 0), {"dtype": torch.int32}, "dtype expected None or one of"),
        ((torch.zeros(3), 0), {"dtype": "float32"}, "dtype expected None or one of"),
    ],
)
def test_wrong_kinds_are_type_errors(name, args, kwargs, message):
    ours_fn, _ = FUNCTIONS[name]
    with pytest.raises(TypeError, match=f"{name}: {message}"):
        ours_fn(*args, **kwargs)


def test_sparse_input_is_a_type_error():
    with pytest.raises(TypeError, match="softmax: input expected a dense"):
        interop.softmax(torch.eye(2).to_sparse(), 0)
