"""jsoftmax.cross_entropy: torch parity, edge cases, low precision, VJP, errors, memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    enable_x64,
    np_dtype,
    random_logits,
    ref_cross_entropy,
    to_f64,
    tolerance,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _cross_entropy as impl

REDUCTIONS = ("mean", "sum", "none")


def _labels(shape, num_classes, seed, ignore_index=-100):
    """Integer labels with every third one ignored."""
    labels = np.asarray(np.random.default_rng(seed).integers(0, num_classes, shape))
    if labels.ndim:
        labels.flat[::3] = ignore_index
    return labels


def _probabilities(shape, axis, seed):
    """Random probability targets along ``axis`` (float64)."""
    raw = np.random.default_rng(seed).random(shape) + 0.05
    return raw / raw.sum(axis=axis, keepdims=True)


def _class_weights(num_classes, seed):
    return np.random.default_rng(seed).random(num_classes) + 0.25


def _to_torch_layout(array: np.ndarray, axis: int) -> np.ndarray:
    """torch keeps classes on dim 1 (dim 0 for an unbatched input)."""
    return np.moveaxis(array, axis, 1 if array.ndim > 1 else 0)


def _from_torch_layout(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, 1 if array.ndim > 1 else 0, axis)


def _torch_loss_and_grads(x64, labels, axis, cotangent, weight=None, **options):
    """torch's float64 loss and gradients (logits, and probability targets when given)."""
    logits = torch.tensor(_to_torch_layout(x64, axis), requires_grad=True)
    probabilities = np.issubdtype(labels.dtype, np.floating)
    if probabilities:
        target = torch.tensor(_to_torch_layout(labels, axis), requires_grad=True)
    else:
        target = torch.tensor(np.asarray(labels, np.int64))  # torch wants int64 class indices
    loss = F.cross_entropy(
        logits, target, weight=None if weight is None else torch.tensor(weight), **options
    )
    loss.backward(torch.tensor(cotangent))
    logits_grad = _from_torch_layout(logits.grad.numpy(), axis)
    target_grad = _from_torch_layout(target.grad.numpy(), axis) if probabilities else None
    return loss.detach().numpy(), logits_grad, target_grad


def _ours_loss_and_grads(x, labels, cotangent, **options):
    """Our loss and gradients (logits, and probability targets when they are floating)."""
    probabilities = jnp.issubdtype(labels.dtype, jnp.floating)
    if probabilities:
        loss, vjp = jax.vjp(lambda x, q: jsoftmax.cross_entropy(x, q, **options), x, labels)
        logits_grad, target_grad = vjp(jnp.asarray(cotangent, loss.dtype))
        return loss, logits_grad, target_grad
    loss, vjp = jax.vjp(lambda x: jsoftmax.cross_entropy(x, labels, **options), x)
    (logits_grad,) = vjp(jnp.asarray(cotangent, loss.dtype))
    return loss, logits_grad, None


# --------------------------------------------------------------------------------------------
# parity with torch.nn.functional.cross_entropy, float64, every option and layout

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.3},
    "weight": {"weight": True},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.3},
    "ignore_index=1": {"ignore_index": 1},
    "weight+smoothing=1": {"weight": True, "label_smoothing": 1.0},
}
# Every option and reduction on [N, C]; the other layouts with the options that touch the
# class axis in different ways (plain, weights with smoothing).
PARITY_CASES = [pytest.param((6, 5), -1, name, REDUCTIONS, id=f"NC-{name}") for name in OPTIONS] + [
    pytest.param(shape, axis, name, ("none", "mean"), id=f"{layout}-{name}")
    for shape, axis, layout in [
        ((5,), 0, "C-unbatched"),
        ((3, 5, 2, 4), 1, "NCd1d2-axis1"),
        ((2, 3, 5), -1, "NdC-axis-1"),
    ]
    for name in ("plain", "weight+smoothing")
]


def _parity_inputs(shape, axis, options, targets):
    """float64 logits, labels (or probabilities), class weights and the remaining options."""
    options = dict(options)
    num_classes = shape[axis]
    weight = _class_weights(num_classes, seed=1) if options.pop("weight", False) else None
    x64 = np.random.default_rng(0).standard_normal(shape) * 3
    class_axis = axis % len(shape)
    row_shape = shape[:class_axis] + shape[class_axis + 1 :]
    if targets == "labels":
        labels = _labels(row_shape, num_classes, 2, options.get("ignore_index", -100))
    else:
        labels = _probabilities(shape, axis, seed=2)
    return x64, labels, weight, row_shape, options


@pytest.mark.parametrize(("shape", "axis", "option_name", "reductions"), PARITY_CASES)
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_matches_torch_values_and_gradients(shape, axis, option_name, reductions, targets):
    x64, labels, weight, row_shape, options = _parity_inputs(
        shape, axis, OPTIONS[option_name], targets
    )
    if targets == "probabilities" and "ignore_index" in options:
        # Both refuse to ignore a class index in a probability target.
        with pytest.raises(RuntimeError, match="ignore_index"):
            _torch_loss_and_grads(x64, labels, axis, np.asarray(1.0), weight, **options)
        with pytest.raises(ValueError, match="ignore_index expected a negative value"):
            jsoftmax.cross_entropy(jnp.asarray(x64), jnp.asarray(labels), axis=axis, **options)
        return
    for reduction in reductions:
        cotangent = (
            np.random.default_rng(3).standard_normal(row_shape)
            if reduction == "none"
            else np.asarray(0.7)
        )
        theirs = _torch_loss_and_grads(
            x64, labels, axis, cotangent, weight, reduction=reduction, **options
        )
        with enable_x64():
            ours = _ours_loss_and_grads(
                jnp.asarray(x64),
                jnp.asarray(labels),
                cotangent,
                axis=axis,
                weight=None if weight is None else jnp.asarray(weight),
                reduction=reduction,
                **options,
            )
            assert ours[0].dtype == jnp.float64
        for mine, reference in zip(ours, theirs, strict=True):
            if reference is None:
                assert mine is None
                continue
            np.testing.assert_allclose(to_f64(mine), reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("option_name", sorted(OPTIONS))
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_float64_reference_matches_torch(option_name, targets):
    # The written-out definition in tests/_helpers.py, the oracle of the edge-case tests below.
    x64, labels, weight, _, options = _parity_inputs((3, 5, 2), 1, OPTIONS[option_name], targets)
    if targets == "probabilities":
        options.pop("ignore_index", None)
    for reduction in REDUCTIONS:
        theirs = _torch_loss_and_grads(
            x64,
            labels,
            1,
            np.asarray(1.0) if reduction != "none" else np.ones((3, 2)),
            weight,
            reduction=reduction,
            **options,
        )[0]
        reference = ref_cross_entropy(x64, labels, 1, weight, reduction=reduction, **options)
        np.testing.assert_allclose(reference, theirs, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------
# ignore_index and the mean's denominator


def test_all_ignored_mean_is_zero_with_zero_gradient_where_torch_gives_nan():
    x = random_logits((4, 6), seed=7)
    labels = jnp.full((4,), -100)
    loss, grad = jax.value_and_grad(lambda x: jsoftmax.cross_entropy(x, labels))(x)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    # The documented difference: torch returns NaN here.
    theirs = F.cross_entropy(
        torch.tensor(np.asarray(x)), torch.tensor(np.asarray(labels, np.int64))
    )
    assert torch.isnan(theirs)


def test_zero_total_weight_mean_is_zero():
    x = random_logits((3, 4), seed=8)
    weight = jnp.array([0.0, 1.0, 1.0, 1.0])
    loss, grad = jax.value_and_grad(
        lambda x: jsoftmax.cross_entropy(x, jnp.array([0, 0, -100]), weight=weight)
    )(x)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_empty_batch_gives_zero_mean_and_empty_none():
    x = jnp.zeros((0, 5))
    assert float(jsoftmax.cross_entropy(x, jnp.zeros((0,), jnp.int32))) == 0.0
    assert float(jsoftmax.cross_entropy(x, jnp.zeros((0, 5)))) == 0.0
    none = jsoftmax.cross_entropy(x, jnp.zeros((0,), jnp.int32), reduction="none")
    assert none.shape == (0,)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_ignored_rows_give_zero_loss_and_gradient_whatever_their_logits(bad):
    x = random_logits((3, 5), seed=9).at[1].set(bad)
    labels = jnp.array([2, -100, 4])
    loss, vjp = jax.vjp(
        lambda x: jsoftmax.cross_entropy(x, labels, label_smoothing=0.2, reduction="none"), x
    )
    (grad,) = vjp(jnp.ones(3))
    assert float(loss[1]) == 0.0
    assert np.all(np.asarray(grad[1]) == 0.0)
    kept = np.array([0, 2])
    reference = ref_cross_entropy(
        np.asarray(x)[kept], np.asarray(labels)[kept], label_smoothing=0.2, reduction="none"
    )
    np.testing.assert_allclose(to_f64(loss)[kept], reference, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)[kept]))


# --------------------------------------------------------------------------------------------
# masked classes (-inf), +inf and NaN


@pytest.mark.parametrize("targets", ["labels", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_classes_are_excluded_and_get_zero_gradient(targets, weighted):
    # Dropping a -inf column leaves every other probability unchanged: torch on the dropped
    # problem is an independent oracle for the kept columns.
    rng = np.random.default_rng(10)
    x64 = rng.standard_normal((5, 6)) * 2
    masked = np.array([False, True, False, False, True, False])
    x64[:, masked] = -np.inf
    kept = ~masked
    weight = _class_weights(6, seed=11) if weighted else None
    if targets == "labels":
        labels = np.array([0, 2, 3, 5, -100])
        labels_kept = np.array([0, 1, 2, 3, -100])  # the same classes, renumbered
    else:
        labels = np.zeros((5, 6))
        labels[:, kept] = _probabilities((5, 4), -1, seed=12)
        labels_kept = labels[:, kept]
    with enable_x64():
        loss, logits_grad, _ = _ours_loss_and_grads(
            jnp.asarray(x64),
            jnp.asarray(labels),
            np.asarray(1.0),
            weight=None if weight is None else jnp.asarray(weight),
        )
    theirs_loss, theirs_grad, _ = _torch_loss_and_grads(
        x64[:, kept],
        labels_kept,
        -1,
        np.asarray(1.0),
        None if weight is None else weight[kept],
    )
    np.testing.assert_allclose(float(loss), float(theirs_loss), rtol=1e-12)
    assert np.all(np.asarray(logits_grad)[:, masked] == 0.0)
    np.testing.assert_allclose(np.asarray(logits_grad)[:, kept], theirs_grad, atol=1e-14)
    if targets == "probabilities":
        # The documented difference: torch's 0 * -inf gives NaN on the unreduced problem.
        full = F.cross_entropy(torch.tensor(x64), torch.tensor(labels))
        assert torch.isnan(full)


@pytest.mark.parametrize(
    ("labels", "options"),
    [
        pytest.param([1, 0], {}, id="label-on-masked-class"),
        pytest.param([0, 2], {"label_smoothing": 0.1}, id="smoothing-onto-masked-class"),
    ],
)
def test_positive_mass_on_masked_class_gives_inf_as_torch_and_no_nan(labels, options):
    x = jnp.array([[0.5, -jnp.inf, 1.0], [2.0, -jnp.inf, 0.0]])
    labels = jnp.array(labels)
    loss, grad = jax.value_and_grad(lambda x: jsoftmax.cross_entropy(x, labels, **options))(x)
    theirs = F.cross_entropy(
        torch.tensor(np.asarray(x)), torch.tensor(np.asarray(labels, np.int64)), **options
    )
    assert float(theirs) == np.inf
    assert float(loss) == np.inf
    assert not np.any(np.isnan(np.asarray(grad)))
    assert np.all(np.asarray(grad)[:, 1] == 0.0)


def test_fully_masked_row_gives_inf_loss_and_zero_gradient():
    x = jnp.array([[-jnp.inf] * 4, [0.0, 1.0, 2.0, 3.0]])
    labels = jnp.array([1, 2])
    loss, vjp = jax.vjp(lambda x: jsoftmax.cross_entropy(x, labels, reduction="none"), x)
    (grad,) = vjp(jnp.ones(2))
    assert float(loss[0]) == np.inf
    assert np.all(np.asarray(grad[0]) == 0.0)
    reference = ref_cross_entropy(np.asarray(x[1:]), np.asarray(labels[1:]), reduction="none")
    np.testing.assert_allclose(to_f64(loss[1:]), reference, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad[1])))


def test_plus_inf_logits_win_their_row():
    # The limit as those logits grow: the +inf entries share the probability mass.
    x = jnp.array([[jnp.inf, 0.0, 1.0], [jnp.inf, jnp.inf, 1.0], [jnp.inf, 0.0, 1.0]])
    labels = jnp.array([0, 1, 2])
    loss, vjp = jax.vjp(lambda x: jsoftmax.cross_entropy(x, labels, reduction="none"), x)
    (grad,) = vjp(jnp.ones(3))
    np.testing.assert_allclose(np.asarray(loss), [0.0, np.log(2.0), np.inf], rtol=1e-6)
    assert not np.any(np.isnan(np.asarray(grad)))
    np.testing.assert_allclose(np.asarray(grad[0]), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(grad[1]), [0.5, -0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("logits", "weight", "expected"),
    [
        pytest.param([[jnp.inf, 0.0, 1.0]], None, np.inf, id="smoothing-onto-finite-classes"),
        pytest.param([[jnp.inf, jnp.inf, jnp.inf]], None, np.log(3.0), id="all-plus-inf"),
        pytest.param([[jnp.inf, 0.0, 1.0]], [1.0, 0.0, 0.0], 0.0, id="weight-only-on-the-winner"),
        pytest.param([[jnp.inf, -jnp.inf, 1.0]], [2.0, 1.0, 0.0], np.inf, id="weighted-masked"),
    ],
)
def test_plus_inf_logits_with_label_smoothing(logits, weight, expected):
    # The +inf limit again: smoothing mass on a class that is not +inf costs +inf.
    x = jnp.array(logits)
    labels = jnp.array([0])
    weight = None if weight is None else jnp.array(weight)
    loss, grad = jax.value_and_grad(
        lambda x: jsoftmax.cross_entropy(x, labels, weight=weight, label_smoothing=0.1)
    )(x)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert not np.any(np.isnan(np.asarray(grad)))


def test_nan_stays_in_its_row():
    x = random_logits((3, 4), seed=13).at[1, 2].set(jnp.nan)
    labels = jnp.array([0, 1, 3])
    loss, vjp = jax.vjp(lambda x: jsoftmax.cross_entropy(x, labels, reduction="none"), x)
    (grad,) = vjp(jnp.ones(3))
    assert np.isnan(float(loss[1]))
    kept = np.array([0, 2])
    reference = ref_cross_entropy(np.asarray(x)[kept], np.asarray(labels)[kept], reduction="none")
    np.testing.assert_allclose(to_f64(loss)[kept], reference, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)[kept]))


def test_out_of_range_labels_give_nan_for_their_row_only():
    x = random_logits((4, 5), seed=14)
    labels = jnp.array([0, 5, -3, 4])
    loss, vjp = jax.vjp(lambda x: jsoftmax.cross_entropy(x, labels, reduction="none"), x)
    (grad,) = vjp(jnp.ones(4))
    assert np.all(np.isnan(np.asarray(loss[1:3])))
    assert np.all(np.isnan(np.asarray(grad[1:3])))
    kept = np.array([0, 3])
    reference = ref_cross_entropy(np.asarray(x)[kept], np.asarray(labels)[kept], reduction="none")
    np.testing.assert_allclose(to_f64(loss)[kept], reference, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)[kept]))
    assert np.isnan(float(jsoftmax.cross_entropy(x, labels)))


def test_large_offsets_keep_their_digits():
    # Softmax is shift invariant; a naive exp would overflow at 1e4.
    x = random_logits((4, 9), seed=15) + 1e4
    labels = jnp.array([0, 3, 8, 2])
    for options in ({}, {"label_smoothing": 0.2}):
        ours = jsoftmax.cross_entropy(x, labels, reduction="none", **options)
        reference = ref_cross_entropy(x, labels, reduction="none", **options)
        np.testing.assert_allclose(to_f64(ours), reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# low precision


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_low_precision_accumulates_in_float32_and_rounds_once(dtype, targets):
    x = random_logits((16, 300), dtype, seed=16)
    if targets == "labels":
        labels = jnp.asarray(_labels((16,), 300, seed=17))
    else:
        labels = jnp.asarray(_probabilities((16, 300), -1, seed=17), dtype)
    loss, vjp = jax.vjp(
        lambda x: jsoftmax.cross_entropy(x, labels, label_smoothing=0.1, reduction="none"), x
    )
    (grad,) = vjp(jnp.ones(16, dtype))
    assert loss.dtype == grad.dtype == np_dtype(dtype)
    reference = ref_cross_entropy(x, labels, label_smoothing=0.1, reduction="none")
    # float32 compute then one rounding: within one unit in the last place of the exact value.
    ulp = np.spacing(np.abs(reference).astype(np_dtype(dtype))).astype(np.float64)
    assert np.all(np.abs(to_f64(loss) - reference) <= ulp), np.max(
        np.abs(to_f64(loss) - reference) / ulp
    )
    _, reference_grad, _ = _torch_loss_and_grads(
        to_f64(x),
        to_f64(labels) if targets == "probabilities" else np.asarray(labels, np.int64),
        -1,
        np.ones(16),
        label_smoothing=0.1,
        reduction="none",
    )
    np.testing.assert_allclose(to_f64(grad), reference_grad, **tolerance(dtype, grad=True))


# --------------------------------------------------------------------------------------------
# the custom VJP


@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_saves_the_logits_and_per_row_values_only(targets):
    from jax._src.ad_checkpoint import saved_residuals  # the utility behind print_saved_residuals

    x = random_logits((3, 8), seed=18)
    labels = (
        jnp.array([1, 7, -100])
        if targets == "labels"
        else jnp.asarray(_probabilities((3, 8), -1, seed=19), jnp.float32)
    )
    residuals = saved_residuals(
        lambda x: jsoftmax.cross_entropy(x, labels, label_smoothing=0.1, weight=jnp.ones(8)), x
    )
    full_size = [source for aval, source in residuals if aval.size == x.size]
    # The logits themselves (alive anyway); probability targets are an input too, not computed.
    expected = 1 if targets == "labels" else 2
    assert len(full_size) == expected, residuals
    assert all("argument" in source or "constant" in source for source in full_size), residuals


def test_residual_probe_detects_a_saved_probability_tensor():
    # The probe above can fail: the textbook formula saves exp(logits) (or the softmax).
    from jax._src.ad_checkpoint import saved_residuals

    labels = jnp.array([1, 7, 2])
    residuals = saved_residuals(
        lambda x: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), labels[:, None], axis=-1)),
        random_logits((3, 8)),
    )
    assert any(aval.size == 24 and "argument" not in source for aval, source in residuals)


@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_second_order_gradients(targets):
    with enable_x64():
        x = jnp.asarray(np.random.default_rng(20).standard_normal((3, 5)))
        weight = jnp.asarray(_class_weights(5, seed=21))
        if targets == "labels":
            labels = jnp.array([4, -100, 0])
            check_grads(
                lambda x: jsoftmax.cross_entropy(
                    x, labels, weight=weight, label_smoothing=0.2, reduction="sum"
                ),
                (x,),
                order=2,
                modes=["rev"],
            )
        else:
            targets = jnp.asarray(_probabilities((3, 5), -1, seed=22))
            check_grads(
                lambda x, q: jsoftmax.cross_entropy(x, q, weight=weight, label_smoothing=0.2),
                (x, targets),
                order=2,
                modes=["rev"],
            )


def test_gradient_rows_sum_to_zero_without_weights():
    x = random_logits((6, 10), seed=23)
    labels = jnp.asarray(_labels((6,), 10, seed=24))
    grad = jax.grad(lambda x: jsoftmax.cross_entropy(x, labels, label_smoothing=0.3))(x)
    np.testing.assert_allclose(to_f64(grad).sum(-1), 0.0, atol=1e-7)


def test_weights_are_constants():
    x = random_logits((4, 3), seed=25)
    labels = jnp.array([0, 1, 2, 1])
    weight_grad = jax.grad(lambda w: jsoftmax.cross_entropy(x, labels, weight=w))(jnp.ones(3))
    assert np.all(np.asarray(weight_grad) == 0.0)


# --------------------------------------------------------------------------------------------
# transformations and compilation


def test_repeated_calls_do_not_retrace():
    x = random_logits((3, 6, 2), seed=26)
    labels = jnp.array([[0, 5], [1, 2], [-100, 3]])
    jsoftmax.cross_entropy(x, labels, axis=1)
    size = impl._cross_entropy_jit._cache_size()
    for axis in (1, -2):
        jsoftmax.cross_entropy(x + 1.0, labels, axis=axis, label_smoothing=0)
        jsoftmax.cross_entropy(x, labels + 0, axis=axis, label_smoothing=0.0)
    assert impl._cross_entropy_jit._cache_size() == size
    jsoftmax.cross_entropy(x, labels, axis=1, label_smoothing=0.5)  # a genuinely new call
    assert impl._cross_entropy_jit._cache_size() == size + 1


def test_composes_with_jit_vmap_and_traced_labels():
    x = random_logits((4, 3, 6), seed=27)
    labels = jnp.asarray(_labels((4, 3), 6, seed=28))
    direct = jsoftmax.cross_entropy(x, labels, reduction="none")
    jitted = jax.jit(lambda x, y: jsoftmax.cross_entropy(x, y, reduction="none"))(x, labels)
    mapped = jax.vmap(lambda x, y: jsoftmax.cross_entropy(x, y, reduction="none"))(x, labels)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(direct), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(direct), rtol=1e-6)
    per_example = jax.vmap(jax.grad(lambda x, y: jsoftmax.cross_entropy(x, y, reduction="sum")))(
        x, labels
    )
    batched = jax.grad(lambda x: jsoftmax.cross_entropy(x, labels, reduction="sum"))(x)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), rtol=1e-6)


def test_training_peak_memory_is_at_most_twice_the_logits():
    # Compile only (nothing allocated): the gradient is the one logits-sized buffer besides the
    # logits; a textbook log_softmax formula holds a third.
    logits = jax.ShapeDtypeStruct((512, 16384), jnp.float32)
    labels = jax.ShapeDtypeStruct((512,), jnp.int32)
    size = 512 * 16384 * 4

    def peak(loss, transform=jax.grad):
        stats = jax.jit(transform(loss)).lower(logits, labels).compile().memory_analysis()
        return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes

    def naive(x, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], axis=-1))

    for transform in (jax.grad, jax.value_and_grad):
        assert peak(jsoftmax.cross_entropy, transform) <= 2 * size + 64 * 1024
    assert peak(naive) > 2.5 * size


# --------------------------------------------------------------------------------------------
# properties

PROFILE = settings(
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROFILE
@given(
    st.lists(st.floats(-50.0, 50.0, width=32), min_size=12, max_size=12),
    st.lists(st.integers(0, 3), min_size=3, max_size=3),
    st.sampled_from([0.0, 0.25]),
)
def test_loss_is_nonnegative_and_matches_reference(values, labels, smoothing):
    x = jnp.asarray(np.array(values, np.float32).reshape(3, 4))
    labels = np.array(labels)
    loss = jsoftmax.cross_entropy(
        x, jnp.asarray(labels), label_smoothing=smoothing, reduction="none"
    )
    assert np.all(np.asarray(loss) >= 0)
    reference = ref_cross_entropy(x, labels, label_smoothing=smoothing, reduction="none")
    np.testing.assert_allclose(to_f64(loss), reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("logits", "labels", "options", "error", "match"),
    [
        pytest.param(
            np.zeros((3, 4)),
            np.zeros((4,), np.int32),
            {},
            ValueError,
            r"cross_entropy: labels expected integer class indices of shape \(3,\)",
            id="label-shape",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros((3,), np.float32),
            {},
            ValueError,
            r"labels expected .* floating probabilities of shape \(3, 4\).*must be an integer",
            id="float-labels-for-indices",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros((3, 5), np.float32),
            {},
            ValueError,
            r"labels expected .*got floating labels of shape \(3, 5\)",
            id="probability-shape",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros((3,), bool),
            {},
            TypeError,
            "labels expected integer class indices.*got dtype bool",
            id="bool-labels",
        ),
        pytest.param(
            np.zeros((3, 4)),
            [0, 1, 2],
            {},
            TypeError,
            "labels expected .* got list",
            id="list-labels",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"reduction": "avg"},
            ValueError,
            "cross_entropy: reduction expected one of 'mean', 'sum', 'none', got 'avg'",
            id="reduction",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"weight": np.ones(3)},
            ValueError,
            r"cross_entropy: weight expected shape \(4,\)",
            id="weight-shape",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"weight": np.ones(4, complex)},
            TypeError,
            "cross_entropy: weight expected a real array",
            id="weight-dtype",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"label_smoothing": 1.5},
            ValueError,
            r"cross_entropy: label_smoothing expected a float in \[0, 1\], got 1.5",
            id="smoothing-range",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"label_smoothing": "0.1"},
            TypeError,
            "cross_entropy: label_smoothing expected a float",
            id="smoothing-type",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"ignore_index": 1.0},
            TypeError,
            "cross_entropy: ignore_index expected an int, got 1.0",
            id="ignore-index-type",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"axis": (1.5,)},
            TypeError,
            r"cross_entropy: axis expected an int or a tuple of ints, got 1.5",
            id="axis-tuple-of-float",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"axis": (1, -1)},
            ValueError,
            r"cross_entropy: axis expected distinct axes",
            id="axis-tuple-repeated",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"where": np.ones((2,), bool)},
            ValueError,
            r"cross_entropy: where expected a boolean mask broadcastable to the logits' shape",
            id="where-shape",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"where": np.ones((3,))},
            TypeError,
            r"cross_entropy: where expected a boolean array, got dtype float",
            id="where-dtype",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"axis": 2},
            ValueError,
            r"cross_entropy: axis expected a value in \[-2, 2\)",
            id="axis-range",
        ),
        pytest.param(
            np.float32(1.0),
            np.int32(0),
            {},
            ValueError,
            "cross_entropy: logits expected an array with a class axis",
            id="scalar-logits",
        ),
        pytest.param(
            np.zeros((3, 0)),
            np.zeros(3, np.int32),
            {},
            ValueError,
            "cross_entropy: logits expected at least one class",
            id="no-classes",
        ),
        pytest.param(
            "logits",
            np.zeros(3, np.int32),
            {},
            TypeError,
            "cross_entropy: logits expected a jax.Array",
            id="logits-kind",
        ),
        pytest.param(
            np.zeros((3, 4)),
            np.zeros(3, np.int32),
            {"axis_name": "vocab"},
            ValueError,
            "cross_entropy: axis_name expected a mesh axis bound by an enclosing jax.shard_map",
            id="unbound-axis-name",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(logits, labels, options, error, match):
    with pytest.raises(error, match=match):
        jsoftmax.cross_entropy(logits, labels, **options)


# --------------------------------------------------------------------------------------------
# optax's arguments: where= and a tuple of class axes


def test_tuple_of_class_axes_matches_optax():
    optax = pytest.importorskip("optax")
    logits = random_logits((2, 3, 4, 5), seed=40)
    labels = jnp.asarray(np.random.default_rng(41).integers(0, 20, (2, 3)))
    ours = jsoftmax.cross_entropy(logits, labels, axis=(2, 3), reduction="none")
    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=(2, 3))
    np.testing.assert_allclose(to_f64(ours), to_f64(theirs), rtol=2e-6)
    grad = jax.grad(lambda x: jsoftmax.cross_entropy(x, labels, axis=(-1, 2), reduction="sum"))
    reference = jax.grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=(2, 3)).sum()
    )
    np.testing.assert_allclose(to_f64(grad(logits)), to_f64(reference(logits)), atol=1e-6)


@pytest.mark.parametrize("per", ["logit", "row"])
def test_where_matches_optax_where_the_label_is_kept(per):
    optax = pytest.importorskip("optax")
    logits = random_logits((6, 7), seed=42)
    labels = jnp.array([0, 6, 3, 2, 5, 1])
    rng = np.random.default_rng(43)
    if per == "logit":
        mask = rng.random((6, 7)) > 0.3
        mask[np.arange(6), np.asarray(labels)] = True  # optax keeps a masked label's logit
    else:
        mask = np.array([True, False, True, True, False, True])
    ours = jsoftmax.cross_entropy(logits, labels, where=mask, reduction="none")
    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    np.testing.assert_allclose(to_f64(ours), to_f64(theirs), rtol=2e-6)
    grad = jax.grad(lambda x: jsoftmax.cross_entropy(x, labels, where=mask, reduction="sum"))
    reference = jax.grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, where=mask).sum()
    )
    np.testing.assert_allclose(to_f64(grad(logits)), to_f64(reference(logits)), atol=1e-6)


def test_where_per_row_is_an_ignored_label_even_with_nan_logits():
    logits = random_logits((4, 5), seed=44).at[1].set(jnp.nan)
    labels = jnp.array([0, 1, 2, 3])
    rows = np.array([True, False, True, True])
    loss, grad = jax.value_and_grad(lambda x: jsoftmax.cross_entropy(x, labels, where=rows))(logits)
    expected = jsoftmax.cross_entropy(logits[rows], labels[rows])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)


def test_where_per_logit_masks_a_label_to_infinity():
    # jsoftmax's rule: a masked class with positive target mass costs +inf (optax would use the
    # label's unmasked logit); the other rows are unaffected and the gradient stays finite.
    logits = random_logits((2, 4), seed=45)
    mask = np.ones((2, 4), bool)
    mask[0, 1] = False
    loss = jsoftmax.cross_entropy(logits, jnp.array([1, 2]), where=mask, reduction="none")
    assert float(loss[0]) == np.inf and np.isfinite(float(loss[1]))
    grad = jax.grad(lambda x: jsoftmax.cross_entropy(x, jnp.array([1, 2]), where=mask))(logits)
    assert np.isfinite(np.asarray(grad)).all() and float(grad[0, 1]) == 0.0
