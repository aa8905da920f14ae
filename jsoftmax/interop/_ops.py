"""torch-facing softmax / log_softmax: jsoftmax's JAX code as torch.library custom ops.

Three custom ops, each with a fake (meta) implementation for ``torch.compile`` and a registered
autograd formula:

* ``jsoftmax::softmax(input, dim, log)`` runs ``jsoftmax.softmax`` / ``log_softmax`` (jitted)
  and saves only its output, as jsoftmax's custom VJP does;
* ``jsoftmax::softmax_backward(grad_output, output, dim, log)`` runs the custom VJP's backward
  rule on that output;
* ``jsoftmax::softmax_double_backward(...)`` is the JAX VJP of that rule, so second derivatives
  are exact (the saved output stays connected to the input in torch's graph); a third
  derivative raises.

Eager calls that need derivatives go through :class:`_Softmax` (and :class:`_SoftmaxGrad` for
the backward), ``autograd.Function``s over the same ops and formulas that also support
``torch.func`` (grad, vjp, jacrev, vmap, jvp, jacfwd, hessian) and forward-mode AD. Forward-mode
rules are torch formulas on the saved output (softmax ``y * (t - sum(y * t))``, log_softmax
``t - sum(exp(y) * t)``, 0 at -inf outputs), so they compose with every transformation.
Calls with nothing to differentiate run the implementation directly.

Tensors cross in both passes through :mod:`._convert` without copies (dense layouts and
permutations are aliased). Expanded (stride-0) tensors, such as the gradient of ``out.sum()``,
cross at their compact size and are broadcast inside the jitted JAX function, so they are never
materialised.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import TransformType, get_interpreter_stack, is_functorch_wrapped_tensor

import jsoftmax

# The custom VJP's backward rules: the torch backward pass runs exactly these, on the saved
# output, instead of re-running the forward pass under jax.vjp.
from jsoftmax._kernel import mode as kernel_mode
from jsoftmax._primitives import vjp_from_output

from ._convert import check_tensor, export_array, import_tensor, x64_scope

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# argument checks shared by the torch-facing functions


def check_float_tensor(tensor: Any, fname: str, argname: str = "input") -> None:
    """TypeError unless ``tensor`` is a dense tensor of a dtype torch.softmax computes in."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fname}: {argname} expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{fname}: {argname} expected a dense (strided) tensor, got layout {tensor.layout}"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fname}: {argname} expected a floating tensor (float16, bfloat16, float32, "
            f"float64), got {tensor.dtype}"
        )


def check_float_dtype(dtype: Any, fname: str) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fname}: dtype expected None or one of torch.float16, torch.bfloat16, "
            f"torch.float32, torch.float64, got {dtype!r}"
        )


def normalize_dim(dim: Any, ndim: int, fname: str, argname: str = "dim") -> int:
    """``dim`` as a non-negative int; IndexError when out of range, as torch raises."""
    if isinstance(dim, bool):
        raise TypeError(f"{fname}: {argname} expected an int, got {dim!r}")
    try:
        index = operator.index(dim)
    except TypeError as err:
        raise TypeError(f"{fname}: {argname} expected an int, got {dim!r}") from err
    # torch treats a 0-d tensor as having one dimension for dim checks.
    rank = max(ndim, 1)
    if not -rank <= index < rank:
        raise IndexError(
            f"{fname}: {argname} expected an int in [{-rank}, {rank - 1}] for a tensor of rank "
            f"{ndim}, got {index}"
        )
    return index % rank


def import_compact(tensor: torch.Tensor, fname: str, argname: str) -> jax.Array:
    """``tensor`` as a JAX array without copies; stride-0 dims come in with size 1.

    The jitted functions broadcast the result back to the full shape, where XLA fuses the
    broadcast instead of materialising it.
    """
    check_tensor(tensor, fname, argname)
    strides = tensor.stride()
    if tensor.numel() and 0 in strides:
        dims = zip(tensor.shape, strides, strict=True)
        compact_shape = [1 if stride == 0 else size for size, stride in dims]
        tensor = tensor.as_strided(compact_shape, strides)
    return import_tensor(tensor, None, fname, argname)


def forward_ad_under_compile() -> bool:
    """Whether ``torch.compile`` is tracing inside a ``torch.autograd.forward_ad`` dual level.

    A custom op traced there loses its inputs' tangents without an error (torch 2.13), so the
    public functions then leave the graph (:func:`run_eagerly`) and take the eager route.
    """
    return torch.compiler.is_compiling() and fwAD._current_level >= 0


@torch.compiler.disable
def run_eagerly(function: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``function(*args, **kwargs)`` outside any ``torch.compile`` graph (a graph break)."""
    return function(*args, **kwargs)


def refuse_nested_forward_mode(fname: str) -> None:
    """Raises inside a forward-mode rule run under two ``torch.func`` jvp levels.

    torch does not differentiate an ``autograd.Function``'s forward-mode rule at an outer jvp
    level (``jacfwd(jacfwd(f))`` gives zeros for its contribution, silently), so forward over
    forward is refused; forward over reverse (``torch.func.hessian``), reverse over forward and
    reverse over reverse work.
    """
    stack = get_interpreter_stack() or ()
    if sum(interpreter.key() == TransformType.Jvp for interpreter in stack) > 1:
        raise RuntimeError(
            f"jsoftmax.interop {fname}: forward-mode AD nested in forward-mode AD (torch.func.jvp "
            "or jacfwd of a jvp / jacfwd) is not supported: torch would drop terms of the "
            "result; use jacfwd(jacrev(f)) (torch.func.hessian) or jacrev for the outer level"
        )


# --------------------------------------------------------------------------------------------
# the JAX side (jitted once per shape, dtype, dim and layout)


@partial(jax.jit, static_argnames=("shape", "axis", "log", "kernel_mode"))
def _jax_forward(
    x: jax.Array, shape: tuple[int, ...], axis: int, log: bool, kernel_mode: str
) -> jax.Array:
    full = jnp.broadcast_to(x, shape)
    return jsoftmax.log_softmax(full, axis=axis) if log else jsoftmax.softmax(full, axis=axis)


# ``kernel_mode`` (JSOFTMAX_CPU_KERNEL) keys the caches: the core picks its CPU kernel or the XLA
# path while tracing.
@partial(jax.jit, static_argnames=("axis", "log", "kernel_mode", "shape"))
def _jax_backward(
    grad_output: jax.Array,
    output: jax.Array,
    axis: int,
    log: bool,
    kernel_mode: str,
    shape: tuple[int, ...] | None = None,
) -> jax.Array:
    """The core's backward pass from the output; both operands broadcast to ``shape`` (the
    torch tensors' shape: either may cross at a compact size), default the output's."""
    shape = output.shape if shape is None else shape
    full_output = jnp.broadcast_to(output, shape)
    return vjp_from_output(full_output, jnp.broadcast_to(grad_output, shape), (axis,), log=log)


@partial(jax.jit, static_argnames=("axis", "log", "kernel_mode", "shape"))
def _jax_double_backward(
    grad_grad_input: jax.Array,
    grad_output: jax.Array,
    output: jax.Array,
    axis: int,
    log: bool,
    kernel_mode: str,
    shape: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    def backward(out: jax.Array, grad: jax.Array) -> jax.Array:
        return vjp_from_output(out, grad, (axis,), log=log)

    shape = output.shape if shape is None else shape
    output = jnp.broadcast_to(output, shape)
    _, pullback = jax.vjp(backward, output, jnp.broadcast_to(grad_output, shape))
    grad_of_output, grad_of_grad_output = pullback(jnp.broadcast_to(grad_grad_input, shape))
    return grad_of_grad_output, grad_of_output


# --------------------------------------------------------------------------------------------
# custom ops


def recorded(*tensors: torch.Tensor) -> bool:
    """Whether an op call must be recorded: under ``torch.compile``, ``torch.jit.trace`` and
    tracing with fake or functional tensors (subclasses), the op itself must be called."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or any(type(tensor) is not torch.Tensor for tensor in tensors)
    )


def eager_tensors(*tensors: torch.Tensor) -> bool:
    """Whether an op's implementation may run directly, skipping torch's custom-op dispatch.

    True for plain tensors in eager mode: not :func:`recorded`, and not wrapped by
    ``torch.func`` (grad, vmap, jvp wrap tensors that have no storage). The implementation is
    the same function either way.
    """
    return not recorded(*tensors) and not any(
        is_functorch_wrapped_tensor(tensor) for tensor in tensors
    )


def differentiated(*tensors: torch.Tensor) -> bool:
    """Whether autograd, forward-mode AD or a ``torch.func`` transform may track ``tensors``.

    Only when none does may a function skip its ``autograd.Function`` and run the
    implementation directly: that route detaches, so it would otherwise drop a derivative.
    """
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return True
    if any(fwAD.unpack_dual(tensor).tangent is not None for tensor in tensors):
        return True
    return not eager_tensors(*tensors)


def _softmax_forward(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    with x64_scope(input.dtype):
        x = import_compact(input, "softmax", "input")
        return export_array(_jax_forward(x, tuple(input.shape), dim, log, kernel_mode()), None)


def _softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool
) -> torch.Tensor:
    with x64_scope(output.dtype):
        grad = import_compact(grad_output, "softmax backward", "grad_output")
        out = import_compact(output, "softmax backward", "output")
        shape = tuple(output.shape)
        return export_array(_jax_backward(grad, out, dim, log, kernel_mode(), shape), None)


_softmax_op = torch.library.custom_op("jsoftmax::softmax", mutates_args=())(_softmax_forward)


@_softmax_op.register_fake
def _(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    # JAX returns its default (row-major) layout whatever the input's strides.
    return input.new_empty(input.shape)


_softmax_backward_op = torch.library.custom_op("jsoftmax::softmax_backward", mutates_args=())(
    _softmax_backward
)


@_softmax_backward_op.register_fake
def _(grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return output.new_empty(output.shape)


def _softmax_double_backward(
    grad_grad_input: torch.Tensor,
    grad_output: torch.Tensor,
    output: torch.Tensor,
    dim: int,
    log: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    fname = "softmax double backward"
    with x64_scope(output.dtype):
        grad_grad = import_compact(grad_grad_input, fname, "grad_grad_input")
        grad = import_compact(grad_output, fname, "grad_output")
        out = import_compact(output, fname, "output")
        grad_of_grad_output, grad_of_output = _jax_double_backward(
            grad_grad, grad, out, dim, log, kernel_mode(), tuple(output.shape)
        )
        return export_array(grad_of_grad_output, None), export_array(grad_of_output, None)


_softmax_double_backward_op = torch.library.custom_op(
    "jsoftmax::softmax_double_backward", mutates_args=()
)(_softmax_double_backward)


@_softmax_double_backward_op.register_fake
def _(
    grad_grad_input: torch.Tensor,
    grad_output: torch.Tensor,
    output: torch.Tensor,
    dim: int,
    log: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return output.new_empty(output.shape), output.new_empty(output.shape)


def _save_output(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.dim, ctx.log = inputs
    ctx.save_for_backward(output)


def _softmax_grad(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
    (output,) = ctx.saved_tensors
    if not differentiated(grad_output, output):
        # A first-order backward in eager mode: nothing needs the op's own autograd record.
        return _softmax_backward(grad_output, output, ctx.dim, ctx.log), None, None
    if not recorded(grad_output, output):
        return _SoftmaxGrad.apply(grad_output, output, ctx.dim, ctx.log), None, None
    return _softmax_backward_op(grad_output, output, ctx.dim, ctx.log), None, None


def _save_grad_and_output(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    grad_output, saved_output, ctx.dim, ctx.log = inputs
    ctx.save_for_backward(grad_output, saved_output)


def _softmax_backward_grad(ctx: Any, grad_grad_input: torch.Tensor) -> tuple[Any, ...]:
    grad_output, output = ctx.saved_tensors
    args = (grad_grad_input, grad_output, output, ctx.dim, ctx.log)
    if not differentiated(grad_grad_input, grad_output, output):
        grads = _softmax_double_backward(*args)
    elif recorded(grad_grad_input, grad_output, output):
        grads = _softmax_double_backward_op(*args)  # its registered autograd raises
    else:
        grads = _SoftmaxGradGrad.apply(*args)  # raises on any further derivative
    return grads[0], grads[1], None, None


def _third_derivative(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise RuntimeError(
        "jsoftmax.interop softmax/log_softmax: derivatives of order three and above are not "
        "implemented (first and second derivatives are)"
    )


torch.library.register_autograd("jsoftmax::softmax", _softmax_grad, setup_context=_save_output)
torch.library.register_autograd(
    "jsoftmax::softmax_backward", _softmax_backward_grad, setup_context=_save_grad_and_output
)
torch.library.register_autograd("jsoftmax::softmax_double_backward", _third_derivative)


# --------------------------------------------------------------------------------------------
# forward mode: tangent maps from the saved output, in torch (so they compose with every
# transformation); the reverse passes above run the core's rules in JAX.


def _tangent(tangent: torch.Tensor, output: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """The tangent of softmax / log_softmax along ``tangent``, from the output.

    softmax: ``y * (t - sum(y * t))``; log_softmax: ``t - sum(exp(y) * t)``, 0 where the output
    is -inf (a masked entry is a constant, as in the core's VJP). bf16/f16 compute in float32.
    """
    compute = torch.promote_types(output.dtype, torch.float32)
    y, t = output.to(compute), tangent.to(compute)
    if log:
        result = t - (y.exp() * t).sum(dim, keepdim=True)
        result = result.masked_fill(y == -torch.inf, 0)
    else:
        result = y * (t - (y * t).sum(dim, keepdim=True))
    return result.to(output.dtype)


def _backward_tangent(
    grad_tangent: torch.Tensor | None,
    output_tangent: torch.Tensor | None,
    grad_output: torch.Tensor,
    output: torch.Tensor,
    dim: int,
    log: bool,
) -> torch.Tensor:
    """The tangent of the backward rule ``b(g, y)`` along ``(t_g, t_y)`` (forward over reverse).

    softmax ``b = y * (g - sum(g * y))``; log_softmax ``b = g' - exp(y) * sum(g')`` with
    ``g' = g`` masked where ``y`` is -inf.
    """
    compute = torch.promote_types(output.dtype, torch.float32)
    y, g = output.to(compute), grad_output.to(compute)
    result = torch.zeros_like(y)
    if log:
        mask = y == -torch.inf
        p = y.exp()
        if grad_tangent is not None:
            tg = grad_tangent.to(compute).masked_fill(mask, 0)
            result = result + tg - p * tg.sum(dim, keepdim=True)
        if output_tangent is not None:
            total = g.masked_fill(mask, 0).sum(dim, keepdim=True)
            result = result - p * output_tangent.to(compute).masked_fill(mask, 0) * total
    else:
        if grad_tangent is not None:
            tg = grad_tangent.to(compute)
            result = result + y * (tg - (tg * y).sum(dim, keepdim=True))
        if output_tangent is not None:
            ty = output_tangent.to(compute)
            result = result + ty * (g - (g * y).sum(dim, keepdim=True))
            result = result - y * (g * ty).sum(dim, keepdim=True)
    return result.to(output.dtype)


def _batch_first(in_dims: tuple[Any, ...], batch_size: int, *tensors: torch.Tensor) -> list[Any]:
    """``tensors`` with their vmap dim moved to the front (unbatched ones expanded)."""
    moved = []
    for tensor, in_dim in zip(tensors, in_dims, strict=False):
        if in_dim is None:
            moved.append(tensor.expand(batch_size, *tensor.shape))
        else:
            moved.append(tensor.movedim(in_dim, 0))
    return moved


class _Softmax(torch.autograd.Function):
    """``jsoftmax::softmax`` with every derivative: reverse (the core's rules in JAX, through
    the registered formulas), forward mode and ``torch.func`` (vmap folds the batch into the
    op's leading dim). Eager calls take this route rather than the op's autograd wrapper,
    which costs ~25 us per call and does not support ``torch.func``.
    """

    @staticmethod
    def forward(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
        if eager_tensors(input):
            return _softmax_forward(input, dim, log)
        out: torch.Tensor = _softmax_op(input, dim, log)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _save_output(ctx, inputs, output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        return _softmax_grad(ctx, grad_output)

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, *unused: Any) -> torch.Tensor:
        refuse_nested_forward_mode("softmax/log_softmax")
        (output,) = ctx.saved_tensors
        return _tangent(tangent, output, ctx.dim, ctx.log)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], input: torch.Tensor, dim: int, log: bool) -> Any:
        (batched,) = _batch_first(in_dims, info.batch_size, input)
        return _Softmax.apply(batched, dim + 1, log), 0


class _SoftmaxGrad(torch.autograd.Function):
    """``jsoftmax::softmax_backward`` with its derivatives, for ``torch.func`` and forward mode
    over reverse (Hessians); its VJP is the core's JAX double backward."""

    @staticmethod
    def forward(
        grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool
    ) -> torch.Tensor:
        if eager_tensors(grad_output, output):
            return _softmax_backward(grad_output, output, dim, log)
        out: torch.Tensor = _softmax_backward_op(grad_output, output, dim, log)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _save_grad_and_output(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:2])

    @staticmethod
    def backward(ctx: Any, grad_grad_input: torch.Tensor) -> tuple[Any, ...]:
        return _softmax_backward_grad(ctx, grad_grad_input)

    @staticmethod
    def jvp(ctx: Any, grad_tangent: Any, output_tangent: Any, *unused: Any) -> torch.Tensor:
        refuse_nested_forward_mode("softmax/log_softmax")
        grad_output, output = ctx.saved_tensors
        return _backward_tangent(
            grad_tangent, output_tangent, grad_output, output, ctx.dim, ctx.log
        )

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        grad_output: torch.Tensor,
        output: torch.Tensor,
        dim: int,
        log: bool,
    ) -> Any:
        grad, out = _batch_first(in_dims, info.batch_size, grad_output, output)
        return _SoftmaxGrad.apply(grad, out, dim + 1, log), 0


class _SoftmaxGradGrad(torch.autograd.Function):
    """``jsoftmax::softmax_double_backward`` for eager and ``torch.func`` calls: any further
    derivative (reverse or forward) raises instead of treating the op as a constant."""

    @staticmethod
    def forward(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if eager_tensors(*args[:3]):
            return _softmax_double_backward(*args)
        out: tuple[torch.Tensor, torch.Tensor] = _softmax_double_backward_op(*args)
        return out

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
        grad_grad, grad, out = _batch_first(in_dims, info.batch_size, *args[:3])
        dim, log = args[3:]
        return _SoftmaxGradGrad.apply(grad_grad, grad, out, dim + 1, log), (0, 0)


# --------------------------------------------------------------------------------------------
# public functions


def _normalize(input: Any, dim: Any, dtype: Any, log: bool, fname: str) -> torch.Tensor:
    if forward_ad_under_compile():
        return run_eagerly(_normalize, input, dim, dtype, log, fname)
    check_float_tensor(input, fname)
    check_float_dtype(dtype, fname)
    axis = normalize_dim(dim, input.ndim, fname)
    if dtype is not None and input.dtype != dtype:
        input = input.to(dtype)
    apply: Callable[[torch.Tensor, int, bool], torch.Tensor]
    if recorded(input):
        apply = _softmax_op  # recorded by torch.compile and other tracers
    elif differentiated(input):
        apply = _Softmax.apply  # every autodiff mode, torch.func included
    else:
        apply = _softmax_forward  # plain eager tensors, nothing to record
    if input.ndim == 0:
        # torch normalises a 0-d tensor as a single-element slice.
        return apply(input.reshape(1), 0, log).reshape(())
    return apply(input, axis, log)


def softmax(input: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""``torch.softmax`` computed by :func:`jsoftmax.softmax`, differentiable through torch.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_j \exp(x_j - m)}, \quad m = \max_j x_j

    Args:
      input: a floating (float16, bfloat16, float32, float64) CPU or CUDA tensor, any layout.
      dim: the dimension to normalise over (negative allowed).
      dtype: optional floating dtype; ``input`` is cast to it first, as in ``torch.softmax``.

    Returns:
      A tensor of ``input``'s shape and device, in ``dtype`` (default ``input.dtype``).

    Raises:
      IndexError: ``dim`` is out of range (as torch raises).
      TypeError: ``input`` is not a floating tensor, or ``dim`` / ``dtype`` is of the wrong kind.

    Note:
      The forward pass runs jsoftmax's jitted JAX code and the backward pass its custom VJP rule
      on the saved output; tensors cross without copies. Unlike torch, a row of all -inf gives
      0 (torch: NaN), and +inf entries share the row's mass (torch: NaN); gradients there are 0.
      bf16/f16 compute in float32. Forward-mode AD (``torch.autograd.forward_ad``,
      ``torch.func.jvp`` / ``jacfwd``), ``torch.func`` (grad, vjp, jacrev, vmap, hessian) and
      second derivatives work; third derivatives raise.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> x = torch.tensor([[1.0, 2.0, 3.0], [float("-inf")] * 3], requires_grad=True)
      >>> y = interop.softmax(x, dim=1)
      >>> print(y.detach().numpy().round(4))
      [[0.09   0.2447 0.6652]
       [0.     0.     0.    ]]
      >>> y[0, 2].backward()
      >>> print(x.grad.numpy().round(4))
      [[-0.0599 -0.1628  0.2227]
       [ 0.      0.      0.    ]]
    """
    return _normalize(input, dim, dtype, False, "softmax")


def log_softmax(input: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""``torch.log_softmax`` computed by :func:`jsoftmax.log_softmax`, differentiable in torch.

    .. math::
        \mathrm{log\_softmax}(x)_i = (x_i - m) - \log \sum_j \exp(x_j - m), \quad m = \max_j x_j

    Args:
      input: a floating (float16, bfloat16, float32, float64) CPU or CUDA tensor, any layout.
      dim: the dimension to normalise over (negative allowed).
      dtype: optional floating dtype; ``input`` is cast to it first, as in ``torch.log_softmax``.

    Returns:
      A tensor of ``input``'s shape and device, in ``dtype`` (default ``input.dtype``).

    Raises:
      IndexError: ``dim`` is out of range (as torch raises).
      TypeError: ``input`` is not a floating tensor, or ``dim`` / ``dtype`` is of the wrong kind.

    Note:
      A row of all -inf gives -inf with gradient 0 (torch: NaN). Otherwise as :func:`softmax`.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> print(interop.log_softmax(torch.tensor([1.0, 2.0, 3.0]), dim=0).numpy().round(4))
      [-2.4076 -1.4076 -0.4076]
    """
    return _normalize(input, dim, dtype, True, "log_softmax")
