"""The torch-facing cross_entropy / CrossEntropyLoss: parity with torch, autograd, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import ref_cross_entropy, tolerance

from jsoftmax import interop
from jsoftmax.interop import _cross_entropy

NUM_CLASSES = 5
# name: (input shape, whether the target is class probabilities)
LAYOUTS = {
    "rows": ((6, NUM_CLASSES), False),
    "spatial": ((3, NUM_CLASSES, 4), False),
    "unbatched": ((NUM_CLASSES,), False),
    "rows_probabilities": ((6, NUM_CLASSES), True),
    "spatial_probabilities": ((3, NUM_CLASSES, 4), True),
}
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_index": {"ignore": True},
    "smoothing": {"label_smoothing": 0.1},
    "all": {"weight": True, "ignore": True, "label_smoothing": 0.25},
}


def _f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def _case(layout: str, options: dict, dtype: torch.dtype = torch.float64, seed: int = 0):
    """Leaf input, target (a leaf too for probabilities), and the keyword arguments."""
    shape, probabilities = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.standard_normal(shape) * 2, dtype=dtype, requires_grad=True)
    class_dim = 1 if len(shape) >= 2 else 0
    if probabilities:
        raw = torch.tensor(rng.random(shape), dtype=dtype)
        target = (raw / raw.sum(class_dim, keepdim=True)).requires_grad_()
    else:
        label_shape = shape[:class_dim] + shape[class_dim + 1 :]
        labels = rng.integers(0, NUM_CLASSES, label_shape)
        if options.get("ignore") and labels.ndim:
            labels.reshape(-1)[::3] = 2  # every third label is the ignored one
        target = torch.tensor(labels, dtype=torch.int64)
    kwargs: dict = {}
    if options.get("weight"):
        kwargs["weight"] = torch.tensor(rng.random(NUM_CLASSES) + 0.5, dtype=dtype)
    if options.get("ignore") and not probabilities:  # torch has no ignore_index for those
        kwargs["ignore_index"] = 2
    if "label_smoothing" in options:
        kwargs["label_smoothing"] = options["label_smoothing"]
    return logits, target, kwargs


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().clone()
    return copy.requires_grad_() if tensor.requires_grad else copy


def _loss_and_grads(fn, logits, target, kwargs, cotangent_seed=1):
    loss = fn(logits, target, **kwargs)
    cotangent = torch.tensor(
        np.random.default_rng(cotangent_seed).standard_normal(loss.shape), dtype=loss.dtype
    )
    leaves = [logits] + ([target] if target.requires_grad else [])
    grads = torch.autograd.grad(loss, leaves, cotangent)
    return loss.detach(), grads


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_values_and_gradients_match_torch_float64(layout, options, reduction):
    logits, target, kwargs = _case(layout, OPTIONS[options])
    kwargs["reduction"] = reduction
    ours = _loss_and_grads(interop.cross_entropy, _fresh(logits), _fresh(target), kwargs)
    theirs = _loss_and_grads(F.cross_entropy, _fresh(logits), _fresh(target), kwargs)
    assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-14)
    for mine, torchs in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(mine, torchs, rtol=1e-11, atol=1e-13)
    # The loss against the float64 definition written out (not only against torch).
    expected = ref_cross_entropy(
        _f64(logits),
        _f64(target) if target.is_floating_point() else target.numpy(),
        axis=1 if logits.ndim >= 2 else 0,
        weight=None if "weight" not in kwargs else _f64(kwargs["weight"]),
        ignore_index=kwargs.get("ignore_index", -100),
        label_smoothing=kwargs.get("label_smoothing", 0.0),
        reduction=reduction,
    )
    np.testing.assert_allclose(_f64(ours[0]), expected, **tolerance("float64"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "rows_probabilities"])
def test_low_precision_against_torch_and_float64(dtype, layout):
    name = str(dtype).removeprefix("torch.")
    logits, target, kwargs = _case(layout, OPTIONS["all"], dtype=dtype)
    kwargs["reduction"] = "none"
    ours = _loss_and_grads(interop.cross_entropy, _fresh(logits), _fresh(target), kwargs)
    theirs = _loss_and_grads(F.cross_entropy, _fresh(logits), _fresh(target), kwargs)
    assert ours[0].dtype == dtype and ours[1][0].dtype == dtype
    np.testing.assert_allclose(_f64(ours[0]), _f64(theirs[0]), **tolerance(name, grad=True))
    np.testing.assert_allclose(_f64(ours[1][0]), _f64(theirs[1][0]), **tolerance(name, grad=True))
    expected = ref_cross_entropy(
        _f64(logits),
        _f64(target) if target.is_floating_point() else target.numpy(),
        axis=1,
        weight=_f64(kwargs["weight"]),
        ignore_index=kwargs.get("ignore_index", -100),
        label_smoothing=kwargs["label_smoothing"],
        reduction="none",
    )
    np.testing.assert_allclose(_f64(ours[0]), expected, **tolerance(name))


def test_all_ignored_mean_is_zero_with_zero_gradient():
    # torch: NaN (0 / 0); jsoftmax: 0 and a zero gradient, so one empty batch cannot poison
    # a training run.
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.full((3,), -100)
    assert torch.isnan(F.cross_entropy(logits, target))
    loss = interop.cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_target_dtypes(target_dtype):
    logits, target, _ = _case("rows", {}, dtype=torch.float32)
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(interop.cross_entropy(logits, target.to(target_dtype)), expected)


def test_probability_target_dtype_promotes_as_torch():
    logits, target, _ = _case("rows_probabilities", {}, dtype=torch.float32)
    wide_target = target.detach().double().requires_grad_()
    ours = interop.cross_entropy(_fresh(logits), wide_target)
    assert ours.dtype == F.cross_entropy(_fresh(logits), wide_target).dtype == torch.float64
    ours.backward()
    assert wide_target.grad is not None and wide_target.grad.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# autograd


@pytest.mark.parametrize("layout", ["spatial", "spatial_probabilities"])
def test_gradcheck_float64(layout):
    logits, target, kwargs = _case(layout, OPTIONS["all"])
    kwargs["reduction"] = "none"
    inputs = (logits, target) if target.requires_grad else (logits,)

    def loss(*leaves):
        return interop.cross_entropy(leaves[0], leaves[1] if len(leaves) > 1 else target, **kwargs)

    assert torch.autograd.gradcheck(loss, inputs)


def test_double_backward_matches_torch_and_third_order_raises():
    results = []
    for fn in (interop.cross_entropy, F.cross_entropy):
        logits, target, _ = _case("rows", {})
        (grad,) = torch.autograd.grad(fn(logits, target), logits, create_graph=True)
        (grad_of_grad,) = torch.autograd.grad((grad**2).sum(), logits, create_graph=True)
        results.append(grad_of_grad)
    torch.testing.assert_close(results[0], results[1])
    with pytest.raises(RuntimeError, match="order three and above are not implemented"):
        results[0].sum().backward()


def test_forward_computes_the_loss_only_and_backward_only_needed_gradients(monkeypatch):
    calls = []
    original = _cross_entropy._jax_backward

    def recording(*args, **kwargs):
        calls.append(kwargs["differentiable_target"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_cross_entropy, "_jax_backward", recording)
    logits, target, _ = _case("rows_probabilities", {})
    with torch.no_grad():
        under_no_grad = interop.cross_entropy(logits, target)
    assert not under_no_grad.requires_grad
    interop.cross_entropy(logits, target)
    assert calls == []  # no gradient work in the forward pass
    interop.cross_entropy(logits, target.detach()).backward()
    interop.cross_entropy(logits, target).backward()
    assert calls == [False, True]
    torch.testing.assert_close(under_no_grad, F.cross_entropy(logits, target).detach())


# --------------------------------------------------------------------------------------------
# the module


def test_module_trains_to_the_same_gradients_as_torch():
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    models, losses = (
        [],
        [
            interop.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1),
            torch.nn.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1),
        ],
    )
    for _ in losses:
        torch.manual_seed(0)
        models.append(
            torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        )
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(10, 6, generator=generator)
    targets = torch.randint(0, 4, (10,), generator=generator)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    for _ in range(3):
        grads = []
        for model, loss_fn, optimizer in zip(models, losses, optimizers, strict=True):
            optimizer.zero_grad()
            loss_fn(model(inputs), targets).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        for ours, theirs in zip(*grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_module_keeps_weight_as_a_buffer():
    loss_fn = interop.CrossEntropyLoss(weight=torch.ones(3), reduction="sum")
    assert "weight" in dict(loss_fn.named_buffers())
    assert loss_fn.to(torch.float64).weight.dtype == torch.float64
    assert (
        repr(loss_fn) == "CrossEntropyLoss(ignore_index=-100, reduction='sum', label_smoothing=0.0)"
    )


# --------------------------------------------------------------------------------------------
# errors


LOGITS = torch.zeros(2, 3)
LABELS = torch.zeros(2, dtype=torch.int64)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((LABELS.reshape(2, 1), LABELS), {}, TypeError, "input expected a floating tensor"),
        ((torch.zeros(()), LABELS[0]), {}, ValueError,
         r"input expected a tensor with a class dim \(rank >= 1\)"),
        ((LOGITS, [0, 1]), {}, TypeError, "target expected integer class indices"),
        ((LOGITS, LABELS[:1]), {}, ValueError,
         r"indices of shape \(2,\).*got integer target of shape \(1,\)"),
        ((LOGITS, torch.zeros(2)), {}, ValueError, "got floating target of shape"),
        ((LOGITS, LABELS.bool()), {}, TypeError, "got dtype torch.bool"),
        ((torch.zeros(2, 0), LABELS), {}, ValueError, "at least one class"),
        ((LOGITS, LABELS), {"reduction": "avg"}, ValueError,
         "reduction expected one of 'mean', 'sum', 'none', got 'avg'"),
        ((LOGITS, LABELS), {"label_smoothing": 2.0}, ValueError,
         r"label_smoothing expected a float in \[0, 1\], got 2.0"),
        ((LOGITS, LABELS), {"ignore_index": 1.5}, TypeError, "ignore_index expected an int"),
        ((LOGITS, torch.ones(2, 3) / 3), {"ignore_index": 0}, ValueError,
         "ignore_index expected a negative value"),
        ((LOGITS, LABELS), {"weight": torch.ones(4)}, ValueError, r"weight expected shape \(3,\)"),
        ((LOGITS, LABELS), {"weight": [1.0, 1.0, 1.0]}, TypeError,
         "weight expected None or a floating tensor, got list"),
        ((LOGITS, LABELS), {"weight": torch.ones(3, requires_grad=True)}, ValueError,
         "does not require grad"),
    ],
)  # fmt: skip
def test_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=f"^cross_entropy: .*{message}"):
        interop.cross_entropy(*args, **kwargs)


def test_module_checks_its_options_at_construction():
    with pytest.raises(ValueError, match="CrossEntropyLoss: reduction expected one of"):
        interop.CrossEntropyLoss(reduction="avg")
