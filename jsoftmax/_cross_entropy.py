"""Cross-entropy from logits with torch's semantics and a hand-written VJP.

The loss of one slice (one "row": the logits along the class axis) is

    sum_c t_c * (log_normalizer - x_c),    t_c = effective target mass of class c,

with ``t`` the one-hot label (or the probability target), label-smoothed and class-weighted as
``torch.nn.functional.cross_entropy`` defines it. Two ``jax.custom_jvp`` cores, one for integer
labels and one for probability targets, return the per-row loss; the reductions (torch's weighted
``mean``, ``sum``) are plain JAX on top. Each core's tangent is its hand-written gradient
``softmax * sum(t) - t``, rebuilt in one elementwise pass from the logits and two per-row values
(the shift and the log-normaliser), contracted with the tangent; reverse mode is its transpose,
rematerialised, so it saves the logits (already alive as the input) and the two per-row values,
never a probability tensor. The row statistics follow ``_formula``'s select-free rules, so
XLA fuses them on GPU and TPU as it fuses softmax (``_row_statistics``). The one-hot
target is a comparison with a class iota, never materialised. The label's logit is a gather (one
element per row) or, where the class axis is split across devices, a masked sum finished by a
per-row all-reduce, so the same code shards along the class axis (under ``jit`` with a
NamedSharding, or across ``axis_name`` inside ``shard_map``) with per-row all-reduces only.

On CPU, for integer labels along the last axis (label smoothing only without class weights;
``_label_kernels``), two kernels do the logits-sized work: the row statistics
(``_primitives.label_statistics``, one read of the logits) and, in reverse mode, the gradient
times the per-row cotangent (the transpose of ``_primitives.label_tangent``, one read and one
write). The tangent map is a primitive there because a kernel computing the gradient alone would
leave XLA's transpose of the contraction, a multiply by the cotangent, as another pass over the
logits.
"""

from __future__ import annotations

import math
import operator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _formula, _kernel, _primitives
from ._formula import compute_dtype, global_sum
from ._reductions import axis_size
from ._validation import check_ignore_index, check_input, is_arraylike

_REDUCTIONS = ("mean", "sum", "none")
Axes = tuple[int, ...]


def _class_shape(ndim: int, axis: int, num_classes: int) -> tuple[int, ...]:
    """Shape that puts ``num_classes`` on ``axis`` and 1 elsewhere (broadcasts against logits)."""
    return tuple(num_classes if dim == axis else 1 for dim in range(ndim))


def _class_ids(ndim: int, axis: int, num_local: int, axis_name: Any) -> jax.Array:
    """Global class id of each local position along ``axis`` (shards are equal and in order)."""
    local_ids = lax.broadcasted_iota(jnp.int32, _class_shape(ndim, axis, num_local), axis)
    if axis_name is None:
        return local_ids
    return local_ids + lax.axis_index(axis_name).astype(jnp.int32) * num_local


def _local_weight(weight: jax.Array | None, x: jax.Array, axis: int, axis_name: Any):
    """The class weights of this device's classes in ``x``'s dtype, shaped to broadcast against
    ``x`` (None without weights). Under ``axis_name``, the global weights are sliced."""
    if weight is None:
        return None
    num_local = x.shape[axis]
    if axis_name is not None:
        offset = lax.axis_index(axis_name) * num_local
        weight = lax.dynamic_slice_in_dim(weight, offset, num_local)
    return weight.reshape(_class_shape(x.ndim, axis, num_local)).astype(x.dtype)


def _num_classes(num_local: int, axis_name: Any) -> int:
    return num_local * (1 if axis_name is None else axis_size(axis_name, "cross_entropy"))


def _label_weights(
    labels: jax.Array, weight: jax.Array | None, ignore_index: int, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(valid, out_of_range, label_weight)`` per row.

    ``valid``: the label is not ``ignore_index``; ``out_of_range``: a non-ignored label outside
    ``[0, num_classes)``; ``label_weight``: the class weight of the label (1 without weights),
    0 for ignored or out-of-range labels.
    """
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    if weight is None:
        label_weight = jnp.ones(labels.shape, jnp.float32)
    else:
        label_weight = weight[jnp.where(in_range, labels, 0)]
    label_weight = jnp.where(valid & in_range, label_weight, 0)
    return valid, valid & ~in_range, label_weight


def _row_statistics(
    logits: jax.Array, axes: Axes, axis_name: Any, spread_weight: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(shift, log_normalizer, spread)`` per row (kept axes), in the compute dtype.

    ``shift`` is the row maximum and ``log_normalizer`` is ``log(sum(exp(x - shift)))``, by
    ``_formula``'s rules: for every entry, ``_formula.subtract_shift(x, shift) - log_normalizer``
    is its log-probability, -inf at the finite entries of a row holding +inf and everywhere in a
    row of nothing but -inf (whose normaliser is finite: the sum is reduced from the smallest
    normal float), never NaN unless the row holds NaN. ``spread`` is
    ``sum(spread_weight * -(x - shift))`` with 0 where the weight is 0 (even at -inf), the
    smoothing term; ``spread_weight=1`` for unit weights, None to skip it.

    On GPU and TPU the formulas are select-free on row values, so XLA's fusions keep each pass
    in one kernel. On CPU, XLA (YNNPACK) fuses the plain ``max -> exp(x - max) -> sum`` into one
    pass but materialises a select or a clamp: the plain formulas run first, and only a batch
    with a row maximum of +-inf or NaN takes the exact formulas (``_formula.plain_first``).
    """

    def spread(shifted: jax.Array) -> jax.Array | None:
        if spread_weight is None:
            return None
        if isinstance(spread_weight, (int, float)) and spread_weight == 1:
            return global_sum(-shifted, axes, axis_name)
        terms = jnp.where(spread_weight == 0, 0, spread_weight * -shifted)
        return global_sum(terms, axes, axis_name)

    def finish(shift: jax.Array, shifted: jax.Array, total: jax.Array) -> tuple[Any, ...]:
        return shift, _formula.log_of_sum(total), spread(shifted)

    def exact(logits: jax.Array) -> tuple[Any, ...]:
        shift, shifted = _formula.shifted_input(logits, axes, axis_name)
        return finish(shift, shifted, _formula.exp_sum(shifted, axes, axis_name))

    def cpu(logits: jax.Array) -> tuple[Any, ...]:
        return _formula.plain_first(exact, finish, logits, axes, axis_name)

    return lax.platform_dependent(logits, cpu=cpu, default=exact)


def _varying(array: Any) -> frozenset[Any]:
    """The mesh axes an array varies over inside ``shard_map`` (``aval.mat`` in jax 0.10,
    ``vma`` before)."""
    aval = jax.typeof(array)
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())


def _row_spec(array: Any, rank: int) -> tuple[Any, ...]:
    spec = getattr(getattr(jax.typeof(array), "sharding", None), "spec", None)
    entries = () if spec is None else tuple(spec)
    return (entries + (None,) * rank)[:rank]


def _label_kernels(
    logits: jax.Array, labels: jax.Array, weight: Any, axis: int, axis_name: Any, smoothing: float
) -> bool:
    """Whether the CPU kernels compute the loss's row statistics and its backward pass: integer
    labels, label smoothing only without class weights, classes along the last axis, where the
    softmax kernels apply (``_kernel.eligible``) and the computation runs on CPU (a GPU host also
    has one CPU device; its lowering would take the formulas, in a form XLA fuses worse than this
    module's).

    The primitives type their results after the logits, so labels (or class weights) that vary
    over more ``shard_map`` axes than the logits, or rows sharded otherwise than the logits'
    rows, keep the XLA path, whose ``jnp`` operations join the types.
    """
    rows = logits.ndim - 1
    others = [labels] if weight is None else [labels, weight]
    return (
        (smoothing == 0 or weight is None)
        and axis == rows
        and jax.default_backend() == "cpu"
        and all(_varying(a) <= _varying(logits) for a in others)
        and _row_spec(labels, rows) == _row_spec(logits, rows)
        and _kernel.eligible(logits, (axis,), axis_name)
    )


def _split_explicitly(x: jax.Array, axis: int) -> bool:
    """Whether jit's Explicit sharding splits ``axis`` of ``x`` (a gather along it would fail)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and len(spec) > axis and spec[axis] is not None


def _label_logit(
    x: jax.Array, labels: jax.Array, num_classes: int, axis: int, axis_name: Any
) -> jax.Array:
    """The logit of each row's label (arbitrary for out-of-range labels), with ``axis`` kept.

    A gather reads one element per row. Where the class axis is split (shard_map, or an Explicit
    sharding) a masked sum over the classes is used instead: each device adds the label's logit
    if it holds it, and one per-row all-reduce finishes the pick.
    """
    if axis_name is None and not _split_explicitly(x, axis):
        safe = jnp.where((labels >= 0) & (labels < num_classes), labels, 0)
        return jnp.take_along_axis(x, jnp.expand_dims(safe, axis), axis=axis)
    is_label = _class_ids(x.ndim, axis, x.shape[axis], axis_name) == jnp.expand_dims(labels, axis)
    return global_sum(jnp.where(is_label, x, 0), (axis,), axis_name)


# --------------------------------------------------------------------------------------------
# the derivative rule shared by both cores
#
# Each core is a ``jax.custom_jvp`` whose tangent is ``sum_c G_c * t_c`` per row, with ``G`` the
# gradient of the row's loss rebuilt in one elementwise pass from the logits and two per-row
# values (``_labels_bwd`` / ``_probs_bwd``). The tangent is linear in ``t``, so reverse mode is
# its transpose, ``g * G``; it is rematerialised (``jax.checkpoint``), so reverse mode saves the
# inputs and the two per-row values, never a logits-sized array of its own. Forward mode
# (``jvp``, ``jacfwd``) and higher orders differentiate the same plain-JAX formulas.


def _contract(gradient: jax.Array, tangent: jax.Array, axis: int, axis_name: Any) -> jax.Array:
    """Per row: ``sum_c gradient_c * tangent_c`` across the (possibly sharded) class axis."""
    compute = compute_dtype(gradient.dtype)
    product = gradient.astype(compute) * tangent.astype(compute)
    return jnp.squeeze(global_sum(product, (axis,), axis_name), axis)


def _rematerialized(linear: Any) -> Any:
    # prevent_cse=False: no optimization barrier around the recomputation, so under one jit XLA
    # may merge the row-level work of both directions (a barrier cost GPU and TPU kernels); what
    # reverse mode saves is the same.
    policy = jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(linear, policy=policy, prevent_cse=False)


# --------------------------------------------------------------------------------------------
# integer labels


def _labels_fwd(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    axis: int,
    axis_name: Any,
    ignore_index: int,
    smoothing: float,
) -> tuple[jax.Array, tuple[Any, ...]]:
    compute = compute_dtype(logits.dtype)
    x = logits.astype(compute)
    axes = (axis,)
    num_local = x.shape[axis]
    num_classes = _num_classes(num_local, axis_name)
    valid, out_of_range, label_weight = _label_weights(labels, weight, ignore_index, num_classes)
    label_weight = label_weight.astype(compute)

    spread_weight = None
    if smoothing > 0:
        spread_weight = 1 if weight is None else _local_weight(weight, x, axis, axis_name)
    if _label_kernels(logits, labels, weight, axis, axis_name, smoothing):
        stats = _primitives.label_statistics(logits, kernel=True)
        shift, log_normalizer = stats[..., :1], stats[..., 1:2]
        spread = -stats[..., 2:] if smoothing > 0 else None  # unit weights (no class weights)
    else:
        shift, log_normalizer, spread = _row_statistics(logits, axes, axis_name, spread_weight)
    loss = jnp.zeros(log_normalizer.shape, compute)
    if smoothing < 1:
        label_logit = _label_logit(x, labels, num_classes, axis, axis_name)
        # -log p of the label: +inf for a finite label in a row holding +inf (its shifted value
        # is -inf there), log(k) for one of k +inf labels.
        nll = log_normalizer - _formula.subtract_shift(label_logit, shift)
        loss += (1 - smoothing) * jnp.expand_dims(label_weight, axis) * nll
    if smoothing > 0:
        # W * log_normalizer + sum_c w_c * -(x_c - shift): every term is >= 0, so the sum does
        # not cancel digits; +inf with smoothing mass on a class of probability 0 (a -inf logit,
        # or a finite one next to +inf), as in torch.
        assert spread is not None  # asked for with a spread_weight
        total_weight = num_classes if weight is None else jnp.sum(weight).astype(compute)
        loss += (smoothing / num_classes) * (total_weight * log_normalizer + spread)
    loss = jnp.squeeze(loss, axis)
    # Ignored rows contribute exactly 0 whatever their logits; out-of-range labels give NaN.
    loss = jnp.where(valid, loss, 0)
    loss = jnp.where(out_of_range, jnp.nan, loss)
    return loss, (logits, labels, weight, shift, log_normalizer)


def _labels_bwd(
    axis: int,
    axis_name: Any,
    ignore_index: int,
    smoothing: float,
    residuals: tuple[Any, ...],
    cotangent: jax.Array,
) -> tuple[jax.Array, None, None]:
    logits, labels, weight, shift, log_normalizer = residuals
    compute = compute_dtype(logits.dtype)
    x = logits.astype(compute)
    num_local = x.shape[axis]
    num_classes = _num_classes(num_local, axis_name)
    valid, out_of_range, label_weight = _label_weights(labels, weight, ignore_index, num_classes)
    # The shift is constant per row: the probabilities come back elementwise, no reduction.
    probs = jnp.exp(_formula.subtract_shift(x, shift) - log_normalizer)

    is_label = _class_ids(x.ndim, axis, num_local, axis_name) == jnp.expand_dims(labels, axis)
    label_mass = jnp.expand_dims((1 - smoothing) * label_weight.astype(compute), axis)
    target = jnp.where(is_label, label_mass, 0)
    total_mass = label_mass
    if smoothing > 0:
        if weight is None:
            target = target + smoothing / num_classes
            total_mass = total_mass + smoothing
        else:
            class_weight = _local_weight(weight, x, axis, axis_name)
            target = target + (smoothing / num_classes) * class_weight
            total_mass = total_mass + (smoothing / num_classes) * jnp.sum(weight).astype(compute)

    g = jnp.expand_dims(jnp.where(valid, cotangent.astype(compute), 0), axis)
    grad = g * (probs * total_mass - target)
    # -inf logits (masked classes) are constants, as in jsoftmax.log_softmax.
    grad = jnp.where(x == -jnp.inf, 0, grad)
    grad = jnp.where(jnp.expand_dims(valid, axis), grad, 0)
    grad = jnp.where(jnp.expand_dims(out_of_range, axis), jnp.nan, grad)
    return grad.astype(logits.dtype), None, None


@partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def _labels_loss(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    axis: int,
    axis_name: Any,
    ignore_index: int,
    smoothing: float,
) -> jax.Array:
    return _labels_fwd(logits, labels, weight, axis, axis_name, ignore_index, smoothing)[0]


@_labels_loss.defjvp
def _labels_loss_jvp(
    axis: int,
    axis_name: Any,
    ignore_index: int,
    smoothing: float,
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
) -> tuple[jax.Array, jax.Array]:
    logits, labels, weight = primals
    loss, residuals = _labels_fwd(logits, labels, weight, axis, axis_name, ignore_index, smoothing)
    if _label_kernels(logits, labels, weight, axis, axis_name, smoothing):
        # The tangent map as a primitive whose transpose is the CPU kernel's backward pass: it
        # takes the per-row cotangent, so reverse mode writes the gradient in one pass (XLA's
        # transpose of the contraction would multiply a kernel's output by it in another).
        shift, log_normalizer = residuals[3], residuals[4]
        stats = jnp.concatenate((shift, log_normalizer), axis=-1)
        num_classes = _num_classes(logits.shape[axis], axis_name)
        valid, out_of_range, label_weight = _label_weights(
            labels, weight, ignore_index, num_classes
        )
        code = jnp.where(out_of_range, -2, jnp.where(valid, labels, -1)).astype(jnp.int32)
        # The row's target mass: the label's weight; with smoothing (no class weights) 1 - s on
        # the label plus s / C on every class, 1 in all. Ignored rows are zero by their code.
        scale = label_weight.astype(loss.dtype)
        if smoothing > 0:
            scale = (1 - smoothing) * scale + smoothing
        tangent = _primitives.label_tangent(
            logits, stats, scale, code, tangents[0], kernel=True,
            label_mass=1 - smoothing, uniform=smoothing / num_classes,
        )  # fmt: skip
        return loss, tangent

    def linear(residuals: tuple[Any, ...], logits_tangent: jax.Array) -> jax.Array:
        ones = jnp.ones(loss.shape, loss.dtype)
        gradient = _labels_bwd(axis, axis_name, ignore_index, smoothing, residuals, ones)[0]
        return _contract(gradient, logits_tangent, axis, axis_name)

    return loss, _rematerialized(linear)(residuals, tangents[0])


# --------------------------------------------------------------------------------------------
# probability targets


def _target_mass(
    targets: jax.Array, class_weight: jax.Array | None, smoothing: float, num_classes: int
) -> jax.Array:
    """``w_c * ((1 - smoothing) * q_c + smoothing / C)``: torch's smoothed, weighted target."""
    mass = targets if smoothing == 0 else (1 - smoothing) * targets + smoothing / num_classes
    return mass if class_weight is None else mass * class_weight


def _probs_fwd(
    logits: jax.Array,
    targets: jax.Array,
    weight: jax.Array | None,
    axis: int,
    axis_name: Any,
    smoothing: float,
) -> tuple[jax.Array, tuple[Any, ...]]:
    compute = compute_dtype(logits.dtype)
    x = logits.astype(compute)
    axes = (axis,)
    num_local = x.shape[axis]
    num_classes = _num_classes(num_local, axis_name)
    class_weight = _local_weight(weight, x, axis, axis_name)
    mass = _target_mass(targets.astype(compute), class_weight, smoothing, num_classes)

    # Zero target mass adds 0 even at a -inf logit (0 * log 0 = 0); torch gives NaN there.
    shift, log_normalizer, weighted_shifted = _row_statistics(logits, axes, axis_name, mass)
    assert weighted_shifted is not None  # asked for with a spread_weight
    total_mass = global_sum(mass, axes, axis_name)
    loss = jnp.squeeze(total_mass * log_normalizer + weighted_shifted, axis)
    return loss, (logits, targets, weight, shift, log_normalizer, total_mass)


def _probs_bwd(
    axis: int,
    axis_name: Any,
    smoothing: float,
    residuals: tuple[Any, ...],
    cotangent: jax.Array,
) -> tuple[jax.Array, jax.Array, None]:
    logits, targets, weight, shift, log_normalizer, total_mass = residuals
    compute = compute_dtype(logits.dtype)
    x = logits.astype(compute)
    num_local = x.shape[axis]
    num_classes = _num_classes(num_local, axis_name)
    class_weight = _local_weight(weight, x, axis, axis_name)
    mass = _target_mass(targets.astype(compute), class_weight, smoothing, num_classes)
    log_probs = _formula.subtract_shift(x, shift) - log_normalizer
    g = jnp.expand_dims(cotangent.astype(compute), axis)

    logits_grad = g * (jnp.exp(log_probs) * total_mass - mass)
    # -inf logits (masked classes) are constants, as in jsoftmax.log_softmax.
    logits_grad = jnp.where(x == -jnp.inf, 0, logits_grad)

    # d loss / d q_c = -(1 - smoothing) * w_c * log p_c; a zero cotangent gives 0, not 0 * inf.
    target_scale = (1 - smoothing) if class_weight is None else (1 - smoothing) * class_weight
    targets_grad = jnp.where(g == 0, 0, g * target_scale * -log_probs)
    return logits_grad.astype(logits.dtype), targets_grad.astype(targets.dtype), None


@partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _probs_loss(
    logits: jax.Array,
    targets: jax.Array,
    weight: jax.Array | None,
    axis: int,
    axis_name: Any,
    smoothing: float,
) -> jax.Array:
    return _probs_fwd(logits, targets, weight, axis, axis_name, smoothing)[0]


def _probs_loss_jvp(
    axis: int, axis_name: Any, smoothing: float, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    logits, targets, weight = primals
    loss, residuals = _probs_fwd(logits, targets, weight, axis, axis_name, smoothing)
    # Symbolic zeros: a target without a tangent adds nothing (and saves nothing).
    live = [not isinstance(t, jax.custom_derivatives.SymbolicZero) for t in tangents[:2]]

    def linear(residuals: tuple[Any, ...], *live_tangents: jax.Array) -> jax.Array:
        ones = jnp.ones(loss.shape, loss.dtype)
        gradients = _probs_bwd(axis, axis_name, smoothing, residuals, ones)[:2]
        chosen = [g for g, keep in zip(gradients, live, strict=True) if keep]
        terms = [
            _contract(g, t, axis, axis_name) for g, t in zip(chosen, live_tangents, strict=True)
        ]
        return sum(terms[1:], terms[0]) if terms else jnp.zeros_like(loss)

    live_tangents = [t for t, keep in zip(tangents[:2], live, strict=True) if keep]
    return loss, _rematerialized(linear)(residuals, *live_tangents)


_probs_loss.defjvp(_probs_loss_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# jitted entry point and the public function


def _safe_divide(total: jax.Array, denominator: jax.Array) -> jax.Array:
    """``total / denominator``, and 0 with zero gradient where the denominator is 0."""
    is_zero = denominator == 0
    return jnp.where(is_zero, 0, total / jnp.where(is_zero, 1, denominator))


@partial(
    jax.jit,
    static_argnames=(
        "axis", "ignore_index", "label_smoothing", "reduction", "axis_name", "dtype", "class_axes",
        "kernel_mode",
    ),
)  # fmt: skip
def _cross_entropy_jit(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None,
    where: jax.Array | None = None,
    *,
    class_axes: tuple[int, ...] | None = None,
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    axis_name: Any,
    dtype: Any,
    kernel_mode: str = "auto",
) -> jax.Array:
    # kernel_mode (JSOFTMAX_CPU_KERNEL) is read by _kernel.eligible while tracing; as a static
    # argument it gives each mode its own compilation.
    del kernel_mode
    logits = logits.astype(dtype)
    compute = compute_dtype(dtype)
    probabilities = jnp.issubdtype(labels.dtype, jnp.floating)
    if class_axes is not None:
        # Several class axes: moved last and flattened (labels are flat indices into them).
        logits = _flatten_classes(logits, class_axes)
        labels = _flatten_classes(labels, class_axes) if probabilities else labels
        where = _flatten_classes(where, class_axes) if where is not None else None
    rows = None
    if where is not None and where.ndim == logits.ndim:
        # Per-logit mask: an excluded logit is a masked class (-inf).
        logits = jnp.where(where, logits, jnp.array(-jnp.inf, logits.dtype))
    elif where is not None:
        # Per-row mask: an excluded row counts as an ignored label (its logits never reach the
        # loss or the gradient, even NaN ones).
        rows = where
        logits = jnp.where(jnp.expand_dims(rows, axis), logits, 0)
        if probabilities:
            labels = jnp.where(jnp.expand_dims(rows, axis), labels, 0)
        else:
            labels = jnp.where(rows, labels, ignore_index)
    # Class weights are constants (torch does not differentiate them either).
    if weight is not None:
        weight = lax.stop_gradient(weight.astype(compute))
    if probabilities:
        loss = _probs_loss(logits, labels, weight, axis, axis_name, label_smoothing)
        # torch's mean over probability targets divides by the number of rows, unweighted.
        counted = loss.size if rows is None else jnp.sum(rows)
        denominator = jnp.asarray(counted, compute)
    else:
        loss = _labels_loss(logits, labels, weight, axis, axis_name, ignore_index, label_smoothing)
        num_classes = _num_classes(logits.shape[axis], axis_name)
        # torch's mean: the sum over the weights of the non-ignored labels.
        denominator = jnp.sum(_label_weights(labels, weight, ignore_index, num_classes)[2])
    if reduction == "none":
        return loss.astype(dtype)
    total = jnp.sum(loss)
    if reduction == "sum":
        return total.astype(dtype)
    return _safe_divide(total, denominator).astype(dtype)


def _flatten_classes(array: jax.Array, class_axes: tuple[int, ...]) -> jax.Array:
    """``array`` with ``class_axes`` moved last and merged into one."""
    rest = tuple(dim for dim in range(array.ndim) if dim not in class_axes)
    moved = jnp.transpose(array, rest + class_axes)
    return moved.reshape(_flat_shape(array.shape, class_axes))


def _flat_shape(shape: tuple[int, ...], class_axes: tuple[int, ...]) -> tuple[int, ...]:
    rest = (n for d, n in enumerate(shape) if d not in class_axes)
    return (*rest, math.prod(shape[d] for d in class_axes))


def _check_class_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """A tuple of distinct class axes, normalised (each checked as a single axis)."""
    if not axis:
        raise ValueError("cross_entropy: axis expected an int or a non-empty tuple of ints, got ()")
    axes = tuple(sorted(_check_class_axis(a, ndim) for a in axis))
    if len(set(axes)) != len(axes):
        raise ValueError(f"cross_entropy: axis expected distinct axes, got {axis!r}")
    return axes


def _check_class_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, jnp.integer)):
        raise TypeError(f"cross_entropy: axis expected an int or a tuple of ints, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"cross_entropy: axis expected a value in [{-ndim}, {ndim}) for logits of rank {ndim}, "
            f"got {axis!r}"
        )
    return operator.index(axis) % ndim


def _check_labels(labels: Any, logits_shape: tuple[int, ...], axis: int) -> jax.Array:
    """Integer class indices of the logits' shape without ``axis``, or float probabilities of it."""
    label_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    expected = (
        f"integer class indices of shape {label_shape} or floating probabilities of shape "
        f"{logits_shape}"
    )
    if not is_arraylike(labels):
        raise TypeError(f"cross_entropy: labels expected {expected}, got {type(labels).__name__}")
    array = jnp.asarray(labels)
    if jnp.issubdtype(array.dtype, jnp.floating):
        if array.shape != logits_shape:
            raise ValueError(
                f"cross_entropy: labels expected {expected}, got floating labels of shape "
                f"{array.shape} (class indices must be an integer dtype)"
            )
        return array
    if not jnp.issubdtype(array.dtype, jnp.integer) or array.dtype == jnp.bool_:
        raise TypeError(f"cross_entropy: labels expected {expected}, got dtype {array.dtype}")
    if array.shape != label_shape:
        raise ValueError(
            f"cross_entropy: labels expected {expected}, got integer labels of shape {array.shape}"
        )
    # Signed, so that a negative ignore_index compares as written.
    signed_64 = jnp.issubdtype(array.dtype, jnp.signedinteger) and array.dtype.itemsize == 8
    return array if signed_64 else array.astype(jnp.int32)


def _check_where(
    where: Any, logits_shape: tuple[int, ...], row_shape: tuple[int, ...]
) -> jax.Array | None:
    """A boolean mask per logit (broadcastable to the logits) or per row (the rows' shape)."""
    if where is None:
        return None
    if not is_arraylike(where) or jnp.asarray(where).dtype != jnp.bool_:
        kind = (
            type(where).__name__ if not is_arraylike(where) else f"dtype {jnp.asarray(where).dtype}"
        )
        raise TypeError(f"cross_entropy: where expected a boolean array, got {kind}")
    mask = jnp.asarray(where)
    if mask.ndim == len(logits_shape):
        try:
            return jnp.broadcast_to(mask, logits_shape)
        except ValueError:
            pass
    elif mask.shape == row_shape:
        return mask
    raise ValueError(
        f"cross_entropy: where expected a boolean mask broadcastable to the logits' shape "
        f"{logits_shape} (per logit) or of the rows' shape {row_shape} (per row), "
        f"got {mask.shape}"
    )


def _check_weight(weight: Any, num_classes: int) -> jax.Array | None:
    if weight is None:
        return None
    if not is_arraylike(weight):
        raise TypeError(
            f"cross_entropy: weight expected a real array of shape ({num_classes},), "
            f"got {type(weight).__name__}"
        )
    array = jnp.asarray(weight)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"cross_entropy: weight expected a real array, got dtype {array.dtype}")
    if array.shape != (num_classes,):
        raise ValueError(
            f"cross_entropy: weight expected shape ({num_classes},) (one weight per class), "
            f"got {array.shape}"
        )
    return array


def cross_entropy(
    logits: Any,
    labels: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    axis_name: Any = None,
    where: Any = None,
) -> jax.Array:
    r"""Cross-entropy between ``softmax(logits)`` and the labels, as torch computes it.

    .. math::
        \ell_n = \sum_c t_{n,c} \left(\log \sum_j e^{x_{n,j}} - x_{n,c}\right),
        \quad t_{n,c} = w_c \left((1 - \varepsilon)\, q_{n,c} + \frac{\varepsilon}{C}\right)

    with :math:`q_n` the one-hot label (or the given probabilities), :math:`w` the class weights
    and :math:`\varepsilon` the label smoothing. For integer labels the one-hot part is weighted
    by the label's class weight, as in ``torch.nn.functional.cross_entropy``.

    Args:
      logits: array of unnormalised scores with the classes along ``axis``. Integer inputs
        promote to the default floating dtype.
      labels: integer class indices of the logits' shape without ``axis``, or floating
        class probabilities of the logits' shape.
      axis: the class axis (an int; ``axis=1`` for torch's ``[N, C, d1, ...]`` layout), or a
        tuple of class axes, as optax's: the classes are then the flattened slice and integer
        labels are flat indices into it.
      weight: optional class weights of shape ``(C,)`` (the global ``C`` under ``axis_name``);
        constants, not differentiated.
      ignore_index: integer labels equal to it contribute 0 to the loss, the gradient and the
        ``mean``'s denominator. Unused for probability targets, where torch and this function
        refuse a non-negative value.
      label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution over the
        ``C`` classes, as torch does.
      reduction: ``"mean"`` (torch's weighted mean: the sum over the summed weights of the
        non-ignored labels; over the number of rows for probability targets), ``"sum"`` or
        ``"none"`` (one loss per row, the labels' shape).
      axis_name: inside ``jax.shard_map``, the mesh axis over which ``axis`` is split: each
        device holds an equal, in-order shard of the classes, the labels are global class ids,
        and every shard gets the global loss of its rows. Reductions run over the rows this
        device holds.
      where: optional boolean mask, as optax's: per logit (the logits' rank, broadcastable to
        their shape; an excluded logit is a masked class, like -inf) or per row (the rows'
        shape; an excluded row counts as an ignored label).

    Returns:
      The loss in the logits' dtype: a scalar, or the per-row losses for ``reduction="none"``.

    Note:
      The derivative is hand-written: ``g * (softmax(x) * sum(t) - t)`` rebuilt from the saved
      logits and two per-row values (no probability tensor is saved); every JAX transformation
      applies (``grad``, ``jvp``, ``jacfwd``, ``hessian``, ...).
      Labels equal to ``ignore_index`` give loss 0 and gradient 0 even when their logits are
      NaN or inf. When the ``mean``'s denominator is 0 (every label ignored, or all their
      weights 0, or no rows) the loss is 0 with gradient 0; torch gives NaN. A -inf logit (a
      masked class) gets gradient 0; with zero target mass it adds 0 to the loss (torch gives
      NaN for probability targets), with positive mass (its label, or label smoothing) the loss
      is +inf, as in torch. A non-ignored label outside ``[0, C)`` gives a NaN loss and gradient
      for its row (torch raises; a jitted function cannot). bf16/f16 logits are computed in
      float32 and the result rounded once.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
      >>> labels = jnp.array([0, -100])
      >>> print(np.asarray(jsoftmax.cross_entropy(logits, labels)).round(4))
      0.4076
      >>> print(np.asarray(jsoftmax.cross_entropy(logits, labels, label_smoothing=0.1,
      ...                                         reduction="none")).round(4))
      [0.5076 0.    ]
    """
    array, out_dtype = check_input(logits, None, "cross_entropy", "logits")
    if array.ndim == 0:
        raise ValueError(
            "cross_entropy: logits expected an array with a class axis (rank >= 1), got a scalar"
        )
    class_axes = None
    if isinstance(axis, tuple):
        class_axes = _check_class_axes(axis, array.ndim)
        if axis_name is not None:
            raise ValueError(
                "cross_entropy: axis expected a single int with axis_name (one sharded class "
                f"axis), got {axis!r}"
            )
    # The loss sees the classes as one axis: the last one when several are flattened.
    flat_shape = array.shape if class_axes is None else _flat_shape(array.shape, class_axes)
    class_axis = len(flat_shape) - 1 if class_axes else _check_class_axis(axis, array.ndim)
    if flat_shape[class_axis] == 0:
        raise ValueError(
            f"cross_entropy: logits expected at least one class along axis {axis}, "
            f"got shape {array.shape}"
        )
    # Probability targets keep the logits' own shape; class indices, the rows' shape.
    floating = is_arraylike(labels) and jnp.issubdtype(jnp.asarray(labels).dtype, jnp.floating)
    targets = _check_labels(labels, array.shape if floating else flat_shape, class_axis)
    num_classes = flat_shape[class_axis]
    if axis_name is not None:
        num_classes *= axis_size(axis_name, "cross_entropy")
    weight_array = _check_weight(weight, num_classes)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, jnp.integer)):
        raise TypeError(f"cross_entropy: ignore_index expected an int, got {ignore_index!r}")
    check_ignore_index(operator.index(ignore_index), targets.dtype, "cross_entropy")
    if jnp.issubdtype(targets.dtype, jnp.floating) and ignore_index >= 0:
        # torch refuses this too: a class index cannot be ignored in a probability target.
        raise ValueError(
            "cross_entropy: ignore_index expected a negative value (unused) with probability "
            f"targets, got {ignore_index}"
        )
    if isinstance(label_smoothing, bool) or not isinstance(
        label_smoothing, (int, float, jnp.floating, jnp.integer)
    ):
        raise TypeError(
            f"cross_entropy: label_smoothing expected a float in [0, 1], got {label_smoothing!r}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(
            f"cross_entropy: label_smoothing expected a float in [0, 1], got {label_smoothing!r}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"cross_entropy: reduction expected one of 'mean', 'sum', 'none', got {reduction!r}"
        )
    mask = _check_where(where, array.shape, flat_shape[:class_axis] + flat_shape[class_axis + 1 :])
    return _cross_entropy_jit(
        array,
        targets,
        weight_array,
        mask,
        class_axes=class_axes,
        axis=class_axis,
        ignore_index=operator.index(ignore_index),
        label_smoothing=float(label_smoothing),
        reduction=reduction,
        axis_name=axis_name,
        dtype=out_dtype,
        kernel_mode=_kernel.mode(),
    )
