"""torch-facing cross-entropy: ``jsoftmax.cross_entropy`` with torch's conventions (class dim 1).

One custom op, ``jsoftmax::cross_entropy``, runs the loss and, when torch will need it, the JAX
VJP of :func:`jsoftmax.cross_entropy` at a unit cotangent, in the same jitted call: every loss
element depends on its own row only, so the gradient for any incoming cotangent is that unit
gradient scaled row by row, which the backward op ``jsoftmax::cross_entropy_scale`` does. The
unit gradient is saved instead of the logits (the same size), and no forward work is repeated.
Second derivatives would need the JAX VJP's own derivative: differentiating the backward pass
raises a clear error instead of returning a wrong (partial) answer.
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
from ._ops import FLOAT_DTYPES, check_float_tensor, import_compact

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# the JAX side


@partial(
    jax.jit,
    static_argnames=(
        "input_shape", "target_shape", "axis", "ignore_index", "label_smoothing", "reduction",
        "input_grad", "target_grad",
    ),
)  # fmt: skip
def _jax_cross_entropy(
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
    input_grad: bool,
    target_grad: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    logits = jnp.broadcast_to(logits, input_shape)
    target = jnp.broadcast_to(target, target_shape)

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

    if target_grad:
        loss, pullback = jax.vjp(loss_of, logits, target)
        logits_grad, target_grad_unit = pullback(jnp.ones_like(loss))
        return loss, logits_grad if input_grad else None, target_grad_unit
    if input_grad:
        loss, pullback = jax.vjp(lambda logits: loss_of(logits, target), logits)
        (logits_grad,) = pullback(jnp.ones_like(loss))
        return loss, logits_grad, None
    return loss_of(logits, target), None, None


# --------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("jsoftmax::cross_entropy", mutates_args=())
def _cross_entropy_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fname = "cross_entropy"
    dtypes = (input.dtype, target.dtype) + (() if weight is None else (weight.dtype,))
    with x64_scope(*dtypes):
        loss, logits_grad, target_grad_unit = _jax_cross_entropy(
            import_compact(input, fname, "input"),
            import_compact(target, fname, "target"),
            None if weight is None else import_compact(weight, fname, "weight"),
            input_shape=tuple(input.shape),
            target_shape=tuple(target.shape),
            axis=class_dim,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
            input_grad=input_grad,
            target_grad=target_grad,
        )
        # Unused gradients come back empty: the op's outputs must be tensors.
        return (
            export_array(loss, None),
            input.new_empty(0) if logits_grad is None else export_array(logits_grad, None),
            target.new_empty(0)
            if target_grad_unit is None
            else export_array(target_grad_unit, None),
        )


@_cross_entropy_op.register_fake
def _(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    input_grad: bool,
    target_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reduction == "none":
        loss_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    else:
        loss_shape = torch.Size([])
    return (
        input.new_empty(loss_shape),
        input.new_empty(input.shape if input_grad else (0,)),
        target.new_empty(target.shape if target_grad else (0,)),
    )


@torch.library.custom_op("jsoftmax::cross_entropy_scale", mutates_args=())
def _scale_op(unit_grad: torch.Tensor, grad_loss: torch.Tensor, class_dim: int) -> torch.Tensor:
    """``unit_grad`` times the incoming cotangent, broadcast along the class dim per row."""
    scale = grad_loss if grad_loss.ndim == 0 else grad_loss.unsqueeze(class_dim)
    return (unit_grad * scale).to(unit_grad.dtype)


@_scale_op.register_fake
def _(unit_grad: torch.Tensor, grad_loss: torch.Tensor, class_dim: int) -> torch.Tensor:
    return unit_grad.new_empty(unit_grad.shape)


def _save_unit_grads(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    _, logits_grad, target_grad_unit = output
    ctx.class_dim = inputs[3]
    # The unit gradients stay differentiable outputs on purpose: with create_graph=True the
    # scaled gradient then depends on them through cross_entropy_scale, whose derivative
    # raises, instead of passing for a constant and silently dropping second-order terms.
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs nobody uses
    ctx.save_for_backward(logits_grad, target_grad_unit)


def _cross_entropy_grad(ctx: Any, grad_loss: torch.Tensor | None, *unused: Any) -> tuple[Any, ...]:
    logits_grad, target_grad_unit = ctx.saved_tensors
    input_grad = target_grad = None
    if grad_loss is None:
        return input_grad, target_grad, None, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        input_grad = _scale_op(logits_grad, grad_loss, ctx.class_dim)
    if ctx.needs_input_grad[1]:
        target_grad = _scale_op(target_grad_unit, grad_loss, ctx.class_dim)
    return input_grad, target_grad, None, None, None, None, None, None, None


def _second_derivative(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise RuntimeError(
        "jsoftmax.interop cross_entropy: second derivatives (differentiating the backward pass) "
        "are not implemented"
    )


torch.library.register_autograd(
    "jsoftmax::cross_entropy", _cross_entropy_grad, setup_context=_save_unit_grads
)
torch.library.register_autograd("jsoftmax::cross_entropy_scale", _second_derivative)


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
      The backward pass is the JAX VJP of :func:`jsoftmax.cross_entropy`, evaluated in the
      forward call (when torch needs gradients) and scaled by the incoming gradient; double
      backward raises. Where torch gives NaN, jsoftmax gives 0 with zero gradient: a ``mean``
      whose targets are all ignored (or all weighted 0). A class index outside ``[0, C)`` gives
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
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _cross_entropy_op(
        input,
        target,
        weight,
        class_dim,
        operator.index(ignore_index),
        reduction,
        float(label_smoothing),
        grad_enabled and input.requires_grad,
        grad_enabled and is_probabilities and target.requires_grad,
    )
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
