"""torch-facing cross-entropy: ``jsoftmax.cross_entropy`` with torch's conventions (class dim 1).

Three custom ops, all computed by JAX from :func:`jsoftmax.cross_entropy`:

* ``jsoftmax::cross_entropy`` runs the loss (no gradient work in the forward pass);
* ``jsoftmax::cross_entropy_backward`` runs its JAX VJP from the saved logits and target (one
  logits-sized tensor kept, as before: the input instead of a precomputed gradient);
* ``jsoftmax::cross_entropy_double_backward`` runs the VJP of that VJP, so second derivatives are
  exact; a third derivative raises.

Eager calls go through :class:`_CrossEntropy` (and :class:`_CrossEntropyGrad` for its gradient),
``autograd.Function``s over those ops with ``setup_context``, so ``torch.func`` works, and with
forward-mode rules: every loss element depends on its own row only, so its tangent is the row's
gradient (the backward op at a unit cotangent) dotted with the row's tangent; the gradient's
tangent is the double backward along the primal tangents (a Hessian is symmetric).
``torch.compile`` cannot trace an ``autograd.Function`` with a forward-mode rule, so there the ops
are recorded with the same formulas registered as their autograd.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import torch

import jsoftmax

from ._convert import export_array, x64_scope
from ._ops import (
    FLOAT_DTYPES,
    check_float_tensor,
    differentiated,
    eager_tensors,
    forward_ad_under_compile,
    import_compact,
    recorded,
    refuse_nested_forward_mode,
    run_eagerly,
)

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# the JAX side: the loss, its VJP and the VJP of that VJP, all from jsoftmax.cross_entropy

_STATIC = ("input_shape", "target_shape", "axis", "ignore_index", "label_smoothing", "reduction")


def _loss_function(
    weight: jax.Array | None,
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> Any:
    def loss_of(logits: jax.Array, target: jax.Array) -> jax.Array:
        return jsoftmax.cross_entropy(
            logits,
            target,
            axis=axis,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    return loss_of


def _gradient_function(loss_of: Any, differentiable_target: bool) -> Any:
    """``(grad_loss, logits, target) -> gradients``: the logits' (and a probability target's)."""

    def gradients(
        grad_loss: jax.Array, logits: jax.Array, target: jax.Array
    ) -> tuple[jax.Array, ...]:
        if differentiable_target:
            _, pullback = jax.vjp(loss_of, logits, target)
            grads: tuple[jax.Array, ...] = pullback(grad_loss)
            return grads
        _, pullback = jax.vjp(lambda logits: loss_of(logits, target), logits)
        return tuple(pullback(grad_loss))

    return gradients


@partial(jax.jit, static_argnames=_STATIC)
def _jax_loss(
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    *,
    input_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> jax.Array:
    loss_of = _loss_function(weight, axis, ignore_index, label_smoothing, reduction)
    loss: jax.Array = loss_of(
        jnp.broadcast_to(logits, input_shape), jnp.broadcast_to(target, target_shape)
    )
    return loss


@partial(jax.jit, static_argnames=(*_STATIC, "differentiable_target"))
def _jax_backward(
    grad_loss: jax.Array,
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    *,
    input_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    differentiable_target: bool,
) -> tuple[jax.Array, ...]:
    loss_of = _loss_function(weight, axis, ignore_index, label_smoothing, reduction)
    gradients = _gradient_function(loss_of, differentiable_target)
    logits = jnp.broadcast_to(logits, input_shape)
    target = jnp.broadcast_to(target, target_shape)
    grad_loss = jnp.broadcast_to(grad_loss, jax.eval_shape(loss_of, logits, target).shape)
    return gradients(grad_loss.astype(logits.dtype), logits, target)


@partial(jax.jit, static_argnames=(*_STATIC, "differentiable_target"))
def _jax_double_backward(
    grad_grads: tuple[jax.Array, ...],
    grad_loss: jax.Array,
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    *,
    input_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    differentiable_target: bool,
) -> tuple[jax.Array, ...]:
    """The VJP of :func:`_jax_backward`: cotangents for ``grad_loss``, logits and target."""
    loss_of = _loss_function(weight, axis, ignore_index, label_smoothing, reduction)
    gradients = _gradient_function(loss_of, differentiable_target)
    logits = jnp.broadcast_to(logits, input_shape)
    target = jnp.broadcast_to(target, target_shape)
    grad_loss = jnp.broadcast_to(grad_loss, jax.eval_shape(loss_of, logits, target).shape)
    grad_loss = grad_loss.astype(logits.dtype)
    cotangents = tuple(
        jnp.broadcast_to(grad, primal.shape)
        for grad, primal in zip(grad_grads, (logits, target), strict=False)
    )
    if differentiable_target:
        _, pullback = jax.vjp(gradients, grad_loss, logits, target)
        grads: tuple[jax.Array, ...] = pullback(cotangents)
        return grads
    _, pullback = jax.vjp(lambda g, x: gradients(g, x, target), grad_loss, logits)
    return tuple(pullback(cotangents))


# --------------------------------------------------------------------------------------------
# custom ops: forward, backward, double backward


def _options(
    input: torch.Tensor,
    target: torch.Tensor,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> dict[str, Any]:
    return {
        "input_shape": tuple(input.shape),
        "target_shape": tuple(target.shape),
        "axis": class_dim,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "reduction": reduction,
    }


def _import(
    fname: str, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    return (
        import_compact(input, fname, "input"),
        import_compact(target, fname, "target"),
        None if weight is None else import_compact(weight, fname, "weight"),
    )


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype, ...]:
    return tuple(tensor.dtype for tensor in tensors if tensor is not None)


def _loss_shape(input: torch.Tensor, class_dim: int, reduction: str) -> torch.Size:
    if reduction == "none":
        return input.shape[:class_dim] + input.shape[class_dim + 1 :]
    return torch.Size([])


def _cross_entropy_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    with x64_scope(*_dtypes(input, target, weight)):
        loss = _jax_loss(
            *_import("cross_entropy", input, target, weight),
            **_options(input, target, class_dim, ignore_index, reduction, label_smoothing),
        )
        return export_array(loss, None)


def _cross_entropy_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    differentiable_target: bool,
) -> list[torch.Tensor]:
    fname = "cross_entropy backward"
    with x64_scope(*_dtypes(grad_loss, input, target, weight)):
        grads = _jax_backward(
            import_compact(grad_loss, fname, "grad_loss"),
            *_import(fname, input, target, weight),
            **_options(input, target, class_dim, ignore_index, reduction, label_smoothing),
            differentiable_target=differentiable_target,
        )
        return [export_array(grad, None) for grad in grads]


def _cross_entropy_double_backward(
    grad_grads: list[torch.Tensor],
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> list[torch.Tensor]:
    fname = "cross_entropy double backward"
    with x64_scope(*_dtypes(grad_loss, input, target, weight)):
        grads = _jax_double_backward(
            tuple(import_compact(grad, fname, "grad_grads") for grad in grad_grads),
            import_compact(grad_loss, fname, "grad_loss"),
            *_import(fname, input, target, weight),
            **_options(input, target, class_dim, ignore_index, reduction, label_smoothing),
            differentiable_target=len(grad_grads) == 2,
        )
        return [export_array(grad, None) for grad in grads]


_forward_op = torch.library.custom_op("jsoftmax::cross_entropy", mutates_args=())(
    _cross_entropy_forward
)
_backward_op = torch.library.custom_op("jsoftmax::cross_entropy_backward", mutates_args=())(
    _cross_entropy_backward
)
_double_backward_op = torch.library.custom_op(
    "jsoftmax::cross_entropy_double_backward", mutates_args=()
)(_cross_entropy_double_backward)


@_forward_op.register_fake
def _(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    return input.new_empty(_loss_shape(input, class_dim, reduction))


@_backward_op.register_fake
def _(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    differentiable_target: bool,
) -> list[torch.Tensor]:
    grads = [input.new_empty(input.shape)]
    return [*grads, target.new_empty(target.shape)] if differentiable_target else grads


@_double_backward_op.register_fake
def _(
    grad_grads: list[torch.Tensor],
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> list[torch.Tensor]:
    grads = [grad_loss.new_empty(grad_loss.shape), input.new_empty(input.shape)]
    return [*grads, target.new_empty(target.shape)] if len(grad_grads) == 2 else grads


def _third_derivative(ctx: Any, *grads: Any) -> Any:
    raise RuntimeError(
        "jsoftmax.interop cross_entropy: derivatives of order three and above are not "
        "implemented (first and second derivatives are)"
    )


# The ops' own autograd formulas, used where the ops are recorded (torch.compile, which cannot
# trace an autograd.Function with a forward-mode rule); eager calls use the Functions below.


def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    input, target, weight, *ctx.options = inputs
    ctx.save_for_backward(input, target, weight)


def _loss_grad(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
    input, target, weight = ctx.saved_tensors
    differentiable_target = bool(ctx.needs_input_grad[1])
    grads = _backward_op(grad_loss, input, target, weight, *ctx.options, differentiable_target)
    grad_target = grads[1] if differentiable_target else None
    return (grads[0], grad_target) + (None,) * (1 + len(ctx.options))


def _save_grad_inputs(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    grad_loss, input, target, weight, *ctx.options, _ = inputs
    ctx.save_for_backward(grad_loss, input, target, weight)


def _grad_grad(ctx: Any, grad_grads: list[torch.Tensor | None]) -> tuple[Any, ...]:
    grad_loss, input, target, weight = ctx.saved_tensors
    filled = [
        torch.zeros_like(primal) if grad is None else grad
        for grad, primal in zip(grad_grads, (input, target), strict=False)
    ]
    grads = _double_backward_op(filled, grad_loss, input, target, weight, *ctx.options)
    grad_target = grads[2] if len(grads) == 3 else None
    return (grads[0], grads[1], grad_target) + (None,) * (2 + len(ctx.options))


torch.library.register_autograd("jsoftmax::cross_entropy", _loss_grad, setup_context=_save_inputs)
torch.library.register_autograd(
    "jsoftmax::cross_entropy_backward", _grad_grad, setup_context=_save_grad_inputs
)
torch.library.register_autograd("jsoftmax::cross_entropy_double_backward", _third_derivative)


def _call(implementation: Any, op: Any, *args: Any) -> Any:
    """The implementation directly for plain untracked eager tensors, else the recorded op."""
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    tensors += [t for arg in args if isinstance(arg, list) for t in arg]
    if eager_tensors(*tensors) and not differentiated(*tensors):
        return implementation(*args)
    return op(*args)


# --------------------------------------------------------------------------------------------
# autograd: one Function for the loss, one for its gradient (so that it is differentiable)


def _vmap_by_loop(function: Any, batch_size: int, in_dims: tuple[Any, ...], *args: Any) -> Any:
    """A vmap rule that applies ``function`` to one batch element at a time and stacks."""

    def element(index: int) -> list[Any]:
        return [
            arg if in_dim is None else arg.select(in_dim, index)
            for arg, in_dim in zip(args, in_dims, strict=True)
        ]

    results = [function.apply(*element(index)) for index in range(batch_size)]
    if isinstance(results[0], tuple):
        stacked = tuple(torch.stack(outputs) for outputs in zip(*results, strict=True))
        return stacked, (0,) * len(stacked)
    return torch.stack(results), 0


class _CrossEntropy(torch.autograd.Function):
    """Loss forward; backward through :class:`_CrossEntropyGrad`; forward mode from it."""

    @staticmethod
    def forward(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        *options: Any,
    ) -> torch.Tensor:
        out: torch.Tensor = _call(
            _cross_entropy_forward, _forward_op, input, target, weight, *options
        )
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, target, weight, *ctx.options = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        input, target, weight = ctx.saved_tensors
        differentiable_target = bool(ctx.needs_input_grad[1])
        grads = _CrossEntropyGrad.apply(
            grad_loss, input, target, weight, differentiable_target, *ctx.options
        )
        grad_target = grads[1] if differentiable_target else None
        return (grads[0], grad_target) + (None,) * (1 + len(ctx.options))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        return _vmap_by_loop(_CrossEntropy, info.batch_size, in_dims, *args)

    @staticmethod
    def jvp(ctx: Any, input_tangent: Any, target_tangent: Any, *unused: Any) -> torch.Tensor:
        refuse_nested_forward_mode("cross_entropy")
        # Every loss element depends on its own row only, so its tangent is the row's unit
        # gradient dotted with the row's tangent (summed over everything for mean and sum).
        input, target, weight = ctx.saved_tensors
        class_dim, _, reduction, _ = ctx.options
        differentiable_target = target_tangent is not None
        unit = input.new_ones(_loss_shape(input, class_dim, reduction))
        grads = _CrossEntropyGrad.apply(
            unit, input, target, weight, differentiable_target, *ctx.options
        )
        products = []
        if input_tangent is not None:
            products.append(grads[0] * input_tangent)
        if differentiable_target:
            products.append(grads[1] * target_tangent)
        product = products[0] if len(products) == 1 else products[0] + products[1]
        if reduction == "none":
            return product.sum(class_dim).to(input.dtype)
        return product.sum().to(input.dtype)


class _CrossEntropyGrad(torch.autograd.Function):
    """``(grad_loss, input, target) -> (grad_input[, grad_target])`` with its own derivatives.

    Its VJP (double backward) is the JAX VJP of the gradient; its forward mode uses that the
    derivative of a gradient is the Hessian, which is symmetric: the tangent of the gradient
    along ``(t_input, t_target)`` is the double backward with those as cotangents.
    """

    @staticmethod
    def forward(
        grad_loss: torch.Tensor,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        differentiable_target: bool,
        *options: Any,
    ) -> tuple[torch.Tensor, ...]:
        grads = _call(
            _cross_entropy_backward,
            _backward_op,
            grad_loss,
            input,
            target,
            weight,
            *options,
            differentiable_target,
        )
        return tuple(grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        return _vmap_by_loop(_CrossEntropyGrad, info.batch_size, in_dims, *args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        grad_loss, input, target, weight, ctx.differentiable_target, *ctx.options = inputs
        ctx.save_for_backward(grad_loss, input, target, weight)
        ctx.save_for_forward(grad_loss, input, target, weight)

    @staticmethod
    def _double_backward(ctx: Any, grad_grads: list[torch.Tensor]) -> list[torch.Tensor]:
        grad_loss, input, target, weight = ctx.saved_tensors
        args = (grad_loss, input, target, weight, *ctx.options)
        if differentiated(*grad_grads, grad_loss, input, target):
            padded = [*grad_grads, None][:2]
            return list(_CrossEntropyGradGrad.apply(*padded, *args))
        out: list[torch.Tensor] = _cross_entropy_double_backward(grad_grads, *args)
        return out

    @staticmethod
    def _filled(ctx: Any, grads: tuple[Any, ...]) -> list[torch.Tensor]:
        _, input, target, _ = ctx.saved_tensors
        primals = [input, target][: len(grads)]
        return [
            torch.zeros_like(primal) if grad is None else grad
            for grad, primal in zip(grads, primals, strict=True)
        ]

    @staticmethod
    def backward(ctx: Any, *grad_grads: Any) -> tuple[Any, ...]:
        grads = _CrossEntropyGrad._double_backward(ctx, _CrossEntropyGrad._filled(ctx, grad_grads))
        grad_target = grads[2] if ctx.differentiable_target else None
        return (grads[0], grads[1], grad_target) + (None,) * (2 + len(ctx.options))

    @staticmethod
    def jvp(
        ctx: Any,
        grad_loss_tangent: Any,
        input_tangent: Any,
        target_tangent: Any,
        *unused: Any,
    ) -> tuple[torch.Tensor, ...]:
        refuse_nested_forward_mode("cross_entropy")
        _, input, target, weight = ctx.saved_tensors
        tangents = [input_tangent, target_tangent][: 1 + ctx.differentiable_target]
        # The symmetric Hessian times the primal tangents ...
        result = _CrossEntropyGrad._double_backward(
            ctx, _CrossEntropyGrad._filled(ctx, tuple(tangents))
        )[1:]
        if grad_loss_tangent is not None:
            # ... plus the gradient (linear in grad_loss) along grad_loss's tangent.
            along_grad = _CrossEntropyGrad.apply(
                grad_loss_tangent, input, target, weight, ctx.differentiable_target, *ctx.options
            )
            result = [a + b for a, b in zip(result, along_grad, strict=True)]
        return tuple(result)


class _CrossEntropyGradGrad(torch.autograd.Function):
    """The double backward op for ``torch.func`` and Hessians; a third derivative raises."""

    @staticmethod
    def forward(
        grad_grad_input: torch.Tensor, grad_grad_target: torch.Tensor | None, *args: Any
    ) -> tuple[torch.Tensor, ...]:
        grad_grads = [grad_grad_input] + ([] if grad_grad_target is None else [grad_grad_target])
        return tuple(_call(_cross_entropy_double_backward, _double_backward_op, grad_grads, *args))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        _third_derivative(ctx)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        _third_derivative(ctx)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        return _vmap_by_loop(_CrossEntropyGradGrad, info.batch_size, in_dims, *args)


# --------------------------------------------------------------------------------------------
# public function and module


def _check_target(
    target: Any, input: torch.Tensor, class_dim: int, fname: str
) -> tuple[torch.Tensor, bool]:
    """Returns ``(target, is_probabilities)``."""
    label_shape = tuple(input.shape[:class_dim] + input.shape[class_dim + 1 :])
    expected = (
        f"integer class indices of shape {label_shape} or floating probabilities of shape "
        f"{tuple(input.shape)}"
    )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fname}: target expected {expected}, got {type(target).__name__}")
    if target.dtype in FLOAT_DTYPES:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"{fname}: target expected {expected}, got floating target of shape "
                f"{tuple(target.shape)} (class indices must be an integer dtype)"
            )
        return target, True
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{fname}: target expected {expected}, got dtype {target.dtype}")
    if tuple(target.shape) != label_shape:
        raise ValueError(
            f"{fname}: target expected {expected}, got integer target of shape "
            f"{tuple(target.shape)}"
        )
    return target, False


def _check_options(
    weight: Any, ignore_index: Any, reduction: Any, label_smoothing: Any, fname: str
) -> None:
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
            kind = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"{fname}: weight expected None or a floating tensor, got {kind}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{fname}: weight expected a tensor that does not require grad (class weights "
                "are not differentiated, as in torch), got one with requires_grad=True"
            )
    if isinstance(ignore_index, bool):
        raise TypeError(f"{fname}: ignore_index expected an int, got {ignore_index!r}")
    try:
        operator.index(ignore_index)
    except TypeError as err:
        raise TypeError(f"{fname}: ignore_index expected an int, got {ignore_index!r}") from err
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fname}: reduction expected one of 'mean', 'sum', 'none', got {reduction!r}"
        )
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(
            f"{fname}: label_smoothing expected a float in [0, 1], got {label_smoothing!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"{fname}: label_smoothing expected a float in [0, 1], got {label_smoothing!r}"
        )


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""``torch.nn.functional.cross_entropy`` computed by :func:`jsoftmax.cross_entropy`.

    .. math::
        \ell_n = \sum_c t_{n,c} \left(\log \sum_j e^{x_{n,j}} - x_{n,c}\right),
        \quad t_{n,c} = w_c \left((1 - \varepsilon)\, q_{n,c} + \frac{\varepsilon}{C}\right)

    Args:
      input: floating logits of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``: the classes
        along dim 1 (dim 0 when unbatched), as in torch.
      target: integer class indices of ``input``'s shape without the class dim, or floating
        class probabilities of ``input``'s shape (differentiable, as in torch).
      weight: optional floating class weights of shape ``(C,)``; not differentiated.
      ignore_index: integer targets equal to it add nothing to the loss, the gradient or the
        ``mean``'s denominator. With probability targets it must be negative (unused).
      reduction: ``"mean"`` (torch's weighted mean), ``"sum"`` or ``"none"``.
      label_smoothing: in ``[0, 1]``, as in torch.

    Returns:
      The loss, a scalar or (``reduction="none"``) one value per row, in the dtype torch
      returns (``input``'s, promoted with a probability target's).

    Raises:
      TypeError: arguments of the wrong kind or dtype.
      ValueError: shapes that do not match, an unknown reduction, label_smoothing outside
        [0, 1], a non-negative ignore_index with probability targets, or a weight that requires
        grad.

    Note:
      The backward pass is the JAX VJP of :func:`jsoftmax.cross_entropy` from the saved
      logits; second derivatives (double backward, ``torch.func.hessian``), forward-mode AD
      (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``) and ``torch.func.vmap``
      work; a third derivative and forward over forward raise. Where torch gives NaN,
      jsoftmax gives 0 with zero gradient: a ``mean`` whose targets are all ignored (or all
      weighted 0). A class index outside ``[0, C)`` gives
      a NaN loss for its row instead of torch's IndexError.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
      >>> loss = interop.cross_entropy(logits, torch.tensor([0, -100]))
      >>> loss.backward()
      >>> print(round(loss.item(), 4), logits.grad[0].numpy().round(4))
      0.4076 [-0.3348  0.2447  0.09  ]
    """
    fname = "cross_entropy"
    if forward_ad_under_compile():
        args = (input, target, weight, ignore_index, reduction, label_smoothing)
        return run_eagerly(cross_entropy, *args)
    check_float_tensor(input, fname)
    if input.ndim == 0:
        raise ValueError(
            f"{fname}: input expected a tensor with a class dim (rank >= 1), got a 0-d tensor"
        )
    class_dim = 1 if input.ndim >= 2 else 0
    target, is_probabilities = _check_target(target, input, class_dim, fname)
    _check_options(weight, ignore_index, reduction, label_smoothing, fname)
    if input.shape[class_dim] == 0:
        raise ValueError(f"{fname}: input expected at least one class, got shape {input.shape}")
    if weight is not None and tuple(weight.shape) != (input.shape[class_dim],):
        raise ValueError(
            f"{fname}: weight expected shape ({input.shape[class_dim]},) (one weight per class), "
            f"got {tuple(weight.shape)}"
        )
    if is_probabilities and operator.index(ignore_index) >= 0:
        # torch refuses this too: no class index can be ignored in a probability target.
        raise ValueError(
            f"{fname}: ignore_index expected a negative value (unused) with probability targets, "
            f"got {ignore_index}"
        )
    if is_probabilities and target.dtype != input.dtype:
        common = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(common), target.to(common)
    options = (class_dim, operator.index(ignore_index), reduction, float(label_smoothing))
    tensors = (input, target) if weight is None else (input, target, weight)
    if recorded(*tensors):
        loss: torch.Tensor = _forward_op(input, target, weight, *options)
    elif differentiated(*tensors):
        loss = _CrossEntropy.apply(input, target, weight, *options)
    else:
        loss = _call(_cross_entropy_forward, _forward_op, input, target, weight, *options)
    return loss


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` computed by jsoftmax (see :func:`cross_entropy`).

    Args:
      weight: optional floating class weights of shape ``(C,)``, kept as a buffer.
      ignore_index: integer targets equal to it are ignored.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: in ``[0, 1]``.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> loss_fn = interop.CrossEntropyLoss(label_smoothing=0.1)
      >>> print(loss_fn, round(loss_fn(torch.zeros(2, 4), torch.tensor([1, 3])).item(), 4))
      CrossEntropyLoss(ignore_index=-100, reduction='mean', label_smoothing=0.1) 1.3863
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        _check_options(weight, ignore_index, reduction, label_smoothing, "CrossEntropyLoss")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )
