"""The primitives behind softmax, log_softmax and logsumexp, and every rule JAX needs for them.

Four primitives:

* ``normalize_p(x[, where])``: softmax or log_softmax (param ``log``), with an optional mask.
* ``tangent_p(y, t[, mode])``: the Jacobian at output ``y`` applied to ``t``, or its transpose
  (param ``transposed``); with param ``from_input=True`` the first operand is the input ``x``
  instead (the CPU kernels recompute the output row by row), with ``from_input="mode"`` it is
  whichever ``residual_p`` gave, as its int32 scalar ``mode`` says (1: the input). Linear in
  ``t``; its transpose is itself with ``transposed`` flipped.
* ``residual_p(x)``: ``(y, residual, mode)`` for the CPU kernels' float32 reverse mode: the
  output twice and 0, or, once jit's dead-code elimination finds the output unused, the input
  twice and 1 (``_residual_dce``).
* ``logsumexp_p(x[, where])``: the log-normaliser, with the reduced axes kept.

And two for cross_entropy with integer labels over the last axis, so that its CPU kernels compute
both directions:

* ``label_stats_p(x)``: each row's ``(shift, log_normalizer, shifted_sum)``, ``[..., 3]``.
* ``label_tangent_p(x, stats, scale, code, t)``: the loss's tangent map, per row
  ``sum_c G_c t_c`` with ``G = scale * (softmax(x) - label_mass * onehot(code) - uniform)``
  (params ``label_mass``, ``uniform``: label smoothing); linear in ``t``, and its
  transpose (param ``transposed``) is ``G * t`` for a per-row ``t``, the backward pass, which the
  CPU kernel computes in one pass over the saved logits.

Why primitives rather than ``jax.custom_vjp``: a custom_vjp cannot be forward-differentiated
(``jvp``, ``jacfwd``, ``hessian``), and a ``jax.custom_jvp`` loses the hand-written backward pass
(reverse mode becomes XLA's transpose of the tangent rule) and gets its primal inlined and
differentiated under ``lax.scan``'s linearization. With primitives, forward mode is
``normalize_p``'s JVP rule (``tangent_p``), reverse mode is ``tangent_p``'s transpose, which saves
one array (the output ``y``; on the CPU kernel path, in float32, the input ``x`` where the output
is otherwise unused, with a scalar saying which), and every
transformation (``vmap``, ``scan``, ``checkpoint``, ``shard_map``, higher orders) composes the
registered rules.

Which implementation runs is decided here, per platform, when lowering: on CPU the hand-written
kernels of ``_kernel.py`` where the bind-time check allowed them (param ``kernel``); on CUDA the
Pallas kernel of ``_gpu.py`` for long rows; everywhere else, and whenever the computation is
being exported (``jax.export`` artifacts must run where jsoftmax's kernels do not exist), the
formulas of ``_formula.py``, which XLA fuses into one kernel per pass on GPU and TPU (on CPU in
their plain form first, ``_formula.plain_first``, which XLA's CPU backend fuses).

This is the only module that uses JAX's rule registries (``jax.interpreters.ad``, ``batching``,
``mlir`` and ``jax.extend.core.Primitive``). They are public modules with a semi-public contract:
``tests/test_transformations.py`` pins the behaviour each rule relies on.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

from . import _formula, _kernel

normalize_p = Primitive("jsoftmax_normalize")
residual_p = Primitive("jsoftmax_residual")
residual_p.multiple_results = True
tangent_p = Primitive("jsoftmax_tangent")
logsumexp_p = Primitive("jsoftmax_logsumexp")
label_stats_p = Primitive("jsoftmax_label_stats")
label_tangent_p = Primitive("jsoftmax_label_tangent")


# ----------------------------------------------------------------------------------------------
# evaluation and abstract evaluation


def _normalize_formula(x: jax.Array, *where: jax.Array, axes, axis_name, log, kernel) -> jax.Array:
    del kernel
    return _formula.normalize(_formula.masked(x, *where), axes, axis_name, log)


def _tangent_formula(
    y, t, *mode, axes, axis_name, log, masked, kernel, transposed, from_input
) -> jax.Array:
    del kernel
    if from_input == "mode":  # the operand is x where mode == 1, else y (residual_p)
        y = jax.lax.cond(
            mode[0] == 1, lambda x: _formula.normalize(x, axes, axis_name, log), lambda y: y, y
        )
    elif from_input:  # the first operand is the input: the output first
        y = _formula.normalize(y, axes, axis_name, log)
    return _formula.tangent(y, t, axes, axis_name, log, transposed, masked)


def _logsumexp_formula(x: jax.Array, *where: jax.Array, axes, axis_name) -> jax.Array:
    return _formula.logsumexp(_formula.masked(x, *where), axes, axis_name)


def _normalize_cpu_formula(x: jax.Array, *where: jax.Array, axes, axis_name, log, kernel):
    del kernel
    return _formula.normalize_cpu(_formula.masked(x, *where), axes, axis_name, log)


def _logsumexp_cpu(x: jax.Array, *where: jax.Array, axes, axis_name) -> jax.Array:
    return _formula.logsumexp_cpu(_formula.masked(x, *where), axes, axis_name)


def _impl(formula: Any):
    """Eager evaluation (a primitive bound outside any trace): the formula, jitted."""

    def impl(*args: jax.Array, **params: Any) -> jax.Array:
        return jax.jit(partial(formula, **params))(*args)

    return impl


normalize_p.def_impl(_impl(_normalize_formula))
tangent_p.def_impl(_impl(_tangent_formula))
logsumexp_p.def_impl(_impl(_logsumexp_formula))
normalize_p.def_abstract_eval(lambda x, *where, **_: x)
tangent_p.def_abstract_eval(lambda y, t, *mode, **_: y)


def _residual_formula(x: jax.Array, *, source, **params: Any) -> list[jax.Array]:
    """``(y, residual, mode)``: with ``source="output"`` the output twice and mode 0; with
    ``source="input"`` (the output is dead: see _residual_dce) the input twice and mode 1."""
    if source == "input":
        return [x, x, jnp.int32(1)]
    y = normalize_p.bind(x, **params)
    return [y, y, jnp.int32(0)]


def _scalar_aval(like: Any) -> Any:
    """An int32 scalar with ``like``'s varying mesh axes (replicated where it is sharded)."""
    changes: dict[str, Any] = {"shape": (), "dtype": jnp.dtype(jnp.int32)}
    sharding: Any = getattr(like, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is not None and spec is not None:
        changes["sharding"] = sharding.update(spec=type(spec)())
    return like.update(**changes)


residual_p.def_impl(lambda x, **params: jax.jit(partial(_residual_formula, **params))(x))
residual_p.def_abstract_eval(lambda x, **_: [x, x, _scalar_aval(x)])


def _logsumexp_abstract(x: Any, *where: Any, axes, axis_name) -> Any:
    del where
    changes: dict[str, Any] = {"shape": tuple(1 if i in axes else n for i, n in enumerate(x.shape))}
    if axis_name is not None:
        # Reduced across axis_name: the same value on every device of those mesh axes, which
        # shard_map's replication check reads from the aval's varying mesh axes (``aval.mat``
        # in jax 0.10, as psum's own abstract evaluation sets it; ``vma`` in older versions).
        names = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))
        mat = getattr(x, "mat", None)
        if mat is not None and hasattr(mat, "varying"):
            varying = frozenset(a for a in mat.varying if a not in names)
            changes["manual_axis_type"] = mat.update(varying=varying)
        elif getattr(x, "vma", None) is not None:
            changes["vma"] = frozenset(x.vma) - names
    sharding: Any = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is not None and spec is not None:
        # A reduced axis of size 1 cannot stay sharded.
        entries = tuple(spec) + (None,) * (len(x.shape) - len(spec))
        kept = type(spec)(*(None if i in axes else entry for i, entry in enumerate(entries)))
        changes["sharding"] = sharding.update(spec=kept)
    return x.update(**changes)


logsumexp_p.def_abstract_eval(_logsumexp_abstract)


def _label_stats_formula(x: jax.Array, *, kernel: bool) -> jax.Array:
    del kernel
    return _formula.label_statistics(x)


def _label_tangent_formula(
    x, stats, scale, code, t, *, transposed, kernel, label_mass, uniform
) -> jax.Array:
    del kernel
    if transposed:  # t per row: the gradient scaled by it
        gradient = _formula.label_gradient(x, stats, scale * t, code, label_mass, uniform)
        return gradient.astype(x.dtype)
    gradient = _formula.label_gradient(x, stats, scale, code, label_mass, uniform)
    return jnp.sum(gradient * t.astype(gradient.dtype), axis=-1)


label_stats_p.def_impl(_impl(_label_stats_formula))
label_tangent_p.def_impl(_impl(_label_tangent_formula))


def _rows_aval(like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """``like``'s abstract value (its varying mesh axes, its sharding of the leading axes) with
    a new last axis, or none: the class axis is never sharded where these primitives apply."""
    changes: dict[str, Any] = {"shape": shape, "dtype": dtype}
    sharding: Any = getattr(like, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is not None and spec is not None:
        entries = tuple(spec) + (None,) * (len(like.shape) - len(spec))
        entries = entries[: len(like.shape) - 1] + (None,) * (len(shape) - len(like.shape) + 1)
        changes["sharding"] = sharding.update(spec=type(spec)(*entries))
    return like.update(**changes)


def _label_stats_abstract(x: Any, *, kernel: bool) -> Any:
    del kernel
    return _rows_aval(x, (*x.shape[:-1], 3), _formula.compute_dtype(x.dtype))


def _label_tangent_abstract(x, stats, scale, code, t, *, transposed, **_: Any) -> Any:
    del stats, scale, code
    if transposed:  # the logits' cotangent
        return _rows_aval(x, x.shape, x.dtype)
    return _rows_aval(t, x.shape[:-1], _formula.compute_dtype(x.dtype))


label_stats_p.def_abstract_eval(_label_stats_abstract)
label_tangent_p.def_abstract_eval(_label_tangent_abstract)


# ----------------------------------------------------------------------------------------------
# lowering: the one dispatch point between the CPU kernels and the formulas


def _kernel_name(log: bool, backward: bool) -> str:
    return f"{'log_softmax' if log else 'softmax'}_{'bwd' if backward else 'fwd'}"


def _normalize_cpu(x: jax.Array, *where: jax.Array, axes, axis_name, log, kernel) -> jax.Array:
    del axis_name, kernel
    return _kernel.call(_kernel_name(log, backward=False), axes, _formula.masked(x, *where))


def _tangent_cpu(y, t, *mode, axes, axis_name, log, masked, kernel, transposed, from_input):
    if from_input == "mode":
        # Under jit the mode is a constant once residual_p is lowered, and XLA keeps only the
        # branch taken; called eagerly, the backward pass reads it.
        params = dict(axes=axes, axis_name=axis_name, log=log, masked=masked, kernel=kernel)
        params["transposed"] = transposed
        return jax.lax.cond(
            mode[0] == 1,
            lambda: _tangent_cpu(y, t, from_input=True, **params),
            lambda: _tangent_cpu(y, t, from_input=False, **params),
        )
    # The backward kernels compute softmax's map (symmetric) and log_softmax's transposed map.
    t = t.astype(y.dtype)
    if log and not transposed:  # forward mode: the output, then the formula
        if from_input:
            y = _kernel.call(_kernel_name(log, backward=False), axes, y)
        return _formula.tangent(y, t, axes, axis_name, log, transposed, masked)
    if masked:
        t = jnp.where(y == 0, jnp.zeros((), t.dtype), t)
    name = _kernel_name(log, backward=True) + ("_from_input" if from_input else "")
    return _kernel.call(name, axes, y, t)


def _label_stats_cpu(x: jax.Array, *, kernel: bool) -> jax.Array:
    del kernel
    result = jax.ShapeDtypeStruct((*x.shape[:-1], 3), jnp.float32)
    return _kernel.call_rows("cross_entropy_stats", result, x)


def _label_tangent_cpu(x, stats, scale, code, t, **params: Any) -> jax.Array:
    if not params["transposed"]:  # forward mode: the formula
        return _label_tangent_formula(x, stats, scale, code, t, **params)
    row_scale = (scale * t).astype(jnp.float32)
    result = jax.ShapeDtypeStruct(x.shape, x.dtype)
    operands = (x, stats[..., :2], row_scale, code.astype(jnp.int32))
    attributes = {
        "label_mass": np.float32(params["label_mass"]),
        "uniform": np.float32(params["uniform"]),
    }
    return _kernel.call_rows("cross_entropy_bwd", result, *operands, **attributes)


def _normalize_cuda(x: jax.Array, *where: jax.Array, axes, axis_name, log, kernel) -> jax.Array:
    # Long rows: the Pallas kernel of _gpu.py (one launch where XLA makes five); otherwise XLA's
    # own fusion of the formula, one kernel per pass. Imported here: CPU users never load Pallas.
    from . import _gpu

    if axis_name is None and _gpu.applies(x.shape, axes):
        rows = _formula.masked(x, *where).reshape(-1, x.shape[-1])
        return _gpu.long_rows(rows, log=log).reshape(x.shape)
    return _normalize_formula(x, *where, axes=axes, axis_name=axis_name, log=log, kernel=kernel)


def _lowering(formula: Any, special: Any | None = None, *, cpu: bool = False):
    """A lowering rule: ``special`` (a kernel) unless exporting, else ``formula``. On CPU the
    kernels also need the bind-time check (param ``kernel``: dtype, layout, mode)."""

    def rule(ctx: Any, *args: Any, **params: Any) -> Any:
        use_special = (
            special is not None
            and (params.get("kernel", False) or not cpu)
            and not ctx.module_context.lowering_parameters.for_export
        )
        chosen: Any = special if use_special else formula
        return mlir.lower_fun(partial(chosen, **params), multiple_results=False)(ctx, *args)

    return rule


# residual_p binds normalize_p, which picks its own lowering per platform.
mlir.register_lowering(residual_p, mlir.lower_fun(_residual_formula, multiple_results=True))


for _primitive, _formula_fn in (
    (normalize_p, _normalize_formula),
    (tangent_p, _tangent_formula),
    (logsumexp_p, _logsumexp_formula),
    (label_stats_p, _label_stats_formula),
    (label_tangent_p, _label_tangent_formula),
):
    mlir.register_lowering(_primitive, _lowering(_formula_fn))
# CPU: the kernels where the bind-time check allowed them (never under export); otherwise the
# formulas, normalize and logsumexp in their plain form first (_formula.plain_first).
mlir.register_lowering(
    normalize_p, _lowering(_normalize_cpu_formula, _normalize_cpu, cpu=True), "cpu"
)
mlir.register_lowering(tangent_p, _lowering(_tangent_formula, _tangent_cpu, cpu=True), "cpu")
mlir.register_lowering(logsumexp_p, _lowering(_logsumexp_cpu), "cpu")
mlir.register_lowering(
    label_stats_p, _lowering(_label_stats_formula, _label_stats_cpu, cpu=True), "cpu"
)
mlir.register_lowering(
    label_tangent_p, _lowering(_label_tangent_formula, _label_tangent_cpu, cpu=True), "cpu"
)
mlir.register_lowering(normalize_p, _lowering(_normalize_formula, _normalize_cuda), "cuda")


# ----------------------------------------------------------------------------------------------
# forward mode


def _zero_like(primal: Any) -> Any:
    return ad.Zero(jax.typeof(primal).to_tangent_aval())


def _normalize_jvp(primals, tangents, **params):
    t = tangents[0]  # the mask has none
    if type(t) is ad.Zero:
        y = normalize_p.bind(*primals, **params)
        return y, _zero_like(y)
    masked = len(primals) > 1
    # With the CPU kernels and float32, the output comes with a residual that is the output
    # itself until jit's dead-code elimination finds the output unused (a gradient alone, a
    # rematerialised call): then it becomes the input, the forward kernel goes, and one kernel
    # reads x and g and writes dx, recomputing each row in cache (_residual_dce). Where the
    # output is used, the backward kernel starts from it: no exponentials recomputed
    # (softmax), no second read of x. An int32 scalar saved with the residual says which it is.
    # 16-bit storage always saves y: there the recomputation (conversions, the exp) costs more
    # than the bytes it saves (benchmarks/NOTES.md). Masked calls keep the output (their rule
    # reads y == 0). Only where the computation runs on CPU: `kernel` is also set on a GPU host
    # (it has one CPU device), whose lowering takes the formulas.
    from_input = (
        params["kernel"]
        and not masked
        and jnp.dtype(primals[0].dtype).itemsize >= 4
        and jax.default_backend() == "cpu"
    )
    if from_input:
        y, residual, mode = residual_p.bind(*primals, source="output", **params)
        return y, tangent_p.bind(
            residual, t, mode, masked=False, transposed=False, from_input="mode", **params
        )
    y = normalize_p.bind(*primals, **params)
    return y, tangent_p.bind(y, t, masked=masked, transposed=False, from_input=False, **params)


def _tangent_jvp(primals, tangents, **params):
    y, t, *mode = primals
    dy, dt = tangents[:2]  # the mode, an integer, has none
    out = tangent_p.bind(y, t, *mode, **params)
    parts = []
    if type(dt) is not ad.Zero:
        parts.append(tangent_p.bind(y, dt, *mode, **params))  # linear in t
    if type(dy) is not ad.Zero:
        # The map's dependence on y (or x, from_input; second and higher derivatives): the
        # formula, differentiated.
        def of_first(out_: jax.Array) -> jax.Array:
            return _tangent_formula(out_, t, *mode, **params)

        parts.append(jax.jvp(of_first, (y,), (dy,))[1])
    if not parts:
        return out, _zero_like(out)
    return out, sum(parts[1:], parts[0])


def _logsumexp_jvp(primals, tangents, *, axes, axis_name):
    x, t = primals[0], tangents[0]
    out = logsumexp_p.bind(*primals, axes=axes, axis_name=axis_name)
    if type(t) is ad.Zero:
        return out, _zero_like(out)
    # d logsumexp = sum(softmax(x) * t): linear in t, so reverse mode transposes it to
    # softmax(x) * g and keeps the probabilities as its one saved array.
    probs = normalize_p.bind(
        *primals, axes=axes, axis_name=axis_name, log=False,
        kernel=bool(_kernel.eligible(x, axes, axis_name)),
    )  # fmt: skip
    compute = _formula.compute_dtype(x.dtype)
    product = probs.astype(compute) * t.astype(compute)
    return out, _formula.global_sum(product, axes, axis_name).astype(out.dtype)


def _label_stats_jvp(primals, tangents, *, kernel):
    (x,), (t,) = primals, tangents
    out = label_stats_p.bind(x, kernel=kernel)
    if type(t) is ad.Zero:
        return out, _zero_like(out)
    return out, jax.jvp(_formula.label_statistics, (x,), (t,))[1]


def _label_tangent_jvp(primals, tangents, **params):
    x, stats, scale, code, t = primals
    dx, dstats, dscale, _, dt = tangents
    out = label_tangent_p.bind(*primals, **params)
    parts = []
    if type(dt) is not ad.Zero:
        parts.append(label_tangent_p.bind(x, stats, scale, code, dt, **params))  # linear in t
    if any(type(d) is not ad.Zero for d in (dx, dstats, dscale)):
        # The map's dependence on the logits, the statistics and the scale (second and higher
        # derivatives): the formula, differentiated.
        def of_operands(x_, stats_, scale_):
            return _label_tangent_formula(x_, stats_, scale_, code, t, **params)

        dense = [ad.instantiate_zeros(d) for d in (dx, dstats, dscale)]
        parts.append(jax.jvp(of_operands, (x, stats, scale), tuple(dense))[1])
    if not parts:
        return out, _zero_like(out)
    return out, sum(parts[1:], parts[0])


ad.primitive_jvps[normalize_p] = _normalize_jvp
ad.primitive_jvps[label_stats_p] = _label_stats_jvp
ad.primitive_jvps[label_tangent_p] = _label_tangent_jvp
ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_jvps[logsumexp_p] = _logsumexp_jvp


def _residual_jvp(primals, tangents, *, source, **params):
    # Differentiating a program that already holds residual_p (forward over reverse): its
    # outputs' tangents, with the residual's the output's or the input's as `source` says.
    (x,), (t,) = primals, tangents
    outs = _residual_formula(x, source=source, **params)
    if source == "input":
        dy: Any = t
    elif type(t) is ad.Zero:
        dy = _zero_like(outs[0])
    else:
        dy = tangent_p.bind(
            outs[0], t, masked=False, transposed=False, from_input=False, **params
        )  # fmt: skip
    return outs, [dy, dy, _zero_like(outs[2])]


ad.primitive_jvps[residual_p] = _residual_jvp


def _residual_dce(used_outputs: list[bool], eqn: Any) -> tuple[list[bool], Any]:
    """Dead-code elimination (under jit, when lowering): if the output is dead but the residual
    is not (a gradient whose output is never used), the residual becomes the input, so no
    forward pass runs and the backward pass starts from x, recomputing each row in cache (one
    kernel reads x and g and writes dx). If the output is used, it stays the residual and the
    backward pass starts from it (no exponentials to recompute)."""
    if not any(used_outputs):
        return [False], None
    if not used_outputs[0] and eqn.params["source"] == "output":
        eqn = eqn.replace(params={**eqn.params, "source": "input"})
    return [True], eqn


pe.dce_rules[residual_p] = _residual_dce


# ----------------------------------------------------------------------------------------------
# reverse mode: the transpose of the tangent map, the hand-written backward pass


def _tangent_transpose(cotangent, y, t, *mode, transposed, **params):
    if ad.is_undefined_primal(y) or any(ad.is_undefined_primal(m) for m in mode):
        raise NotImplementedError("jsoftmax: the tangent map is linear in its tangent only")
    if type(cotangent) is ad.Zero:
        return [None, ad.Zero(t.aval), *(None for _ in mode)]
    back = tangent_p.bind(y, cotangent, *mode, transposed=not transposed, **params)
    return [None, back, *(None for _ in mode)]


ad.primitive_transposes[tangent_p] = _tangent_transpose


def _label_tangent_transpose(cotangent, x, stats, scale, code, t, *, transposed, **params):
    if any(ad.is_undefined_primal(a) for a in (x, stats, scale, code)):
        raise NotImplementedError("jsoftmax: the label tangent map is linear in its tangent only")
    if type(cotangent) is ad.Zero:
        return [None, None, None, None, ad.Zero(t.aval)]
    back = label_tangent_p.bind(
        x, stats, scale, code, cotangent, transposed=not transposed, **params
    )
    return [None, None, None, None, back]


ad.primitive_transposes[label_tangent_p] = _label_tangent_transpose


# ----------------------------------------------------------------------------------------------
# vmap: the batch dimension goes first; the reduced axes move up by one


def _to_front(args, dims) -> list:
    """The operands with the batch dimension first (an unbatched one broadcast along it)."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    return [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]


def _batch(primitive: Primitive, args, dims, *, axes, **params):
    shifted_axes = tuple(a + 1 for a in axes)
    return primitive.bind(*_to_front(args, dims), axes=shifted_axes, **params), 0


for _primitive in (normalize_p, logsumexp_p):
    batching.primitive_batchers[_primitive] = partial(_batch, _primitive)


def _batch_residual(args, dims, *, axes, **params):
    (x,), (d,) = args, dims
    moved = batching.bdim_at_front(x, d, x.shape[d])
    outs = residual_p.bind(moved, axes=tuple(a + 1 for a in axes), **params)
    return outs, [0, 0, None]  # the mode is one for the whole batch


def _batch_tangent(args, dims, *, axes, **params):
    y, t, *mode = args
    if mode and dims[2] is not None:
        raise NotImplementedError("jsoftmax: the residual's mode cannot be batched")
    shifted_axes = tuple(a + 1 for a in axes)
    return tangent_p.bind(*_to_front((y, t), dims[:2]), *mode, axes=shifted_axes, **params), 0


batching.primitive_batchers[residual_p] = _batch_residual
batching.primitive_batchers[tangent_p] = _batch_tangent


def _batch_rows(primitive: Primitive, args, dims, **params):
    """The label primitives work on rows (the last axis) under any leading axes: the batch
    dimension goes first."""
    return primitive.bind(*_to_front(args, dims), **params), 0


for _primitive in (label_stats_p, label_tangent_p):
    batching.primitive_batchers[_primitive] = partial(_batch_rows, _primitive)


# ----------------------------------------------------------------------------------------------
# binding, for _softmax.py


def _operands(x: jax.Array, where: jax.Array | None) -> tuple[jax.Array, ...]:
    return (x,) if where is None else (x, jnp.broadcast_to(where, x.shape))


def normalize(
    x: jax.Array,
    where: jax.Array | None,
    axes: _formula.Axes,
    axis_name: Any,
    *,
    log: bool,
    kernels: bool = True,
) -> jax.Array:
    """softmax / log_softmax; the CPU kernels where ``_kernel.eligible`` allows them, unless
    ``kernels`` is False (a caller whose surrounding XLA code fuses better without them)."""
    kernel = kernels and bool(_kernel.eligible(x, axes, axis_name))
    return normalize_p.bind(
        *_operands(x, where), axes=axes, axis_name=axis_name, log=log, kernel=kernel
    )


def logsumexp(
    x: jax.Array, where: jax.Array | None, axes: _formula.Axes, axis_name: Any
) -> jax.Array:
    return logsumexp_p.bind(*_operands(x, where), axes=axes, axis_name=axis_name)


def vjp_from_output(
    y: jax.Array, cotangent: jax.Array, axes: _formula.Axes, *, log: bool
) -> jax.Array:
    """The backward pass from a saved output: what reverse mode computes, for the torch side."""
    kernel = _kernel.eligible(y, axes, None)
    return tangent_p.bind(
        y, cotangent.astype(y.dtype), axes=axes, axis_name=None, log=log, masked=False,
        kernel=bool(kernel), transposed=True, from_input=False,
    )  # fmt: skip


def label_statistics(x: jax.Array, *, kernel: bool) -> jax.Array:
    """cross_entropy's row statistics ``[..., 3]`` (``_formula.label_statistics``); the CPU
    kernel where ``kernel`` (the caller checked ``_kernel.eligible``)."""
    return label_stats_p.bind(x, kernel=kernel)


def label_tangent(
    x: jax.Array,
    stats: jax.Array,
    scale: jax.Array,
    code: jax.Array,
    t: jax.Array,
    *,
    kernel: bool,
    label_mass: float = 1.0,
    uniform: float = 0.0,
) -> jax.Array:
    """cross_entropy's tangent map (per row ``sum_c G_c t_c``); reverse mode transposes it into
    the CPU kernel's backward pass where ``kernel``."""
    return label_tangent_p.bind(
        x, stats, scale, code, t, transposed=False, kernel=kernel,
        label_mass=float(label_mass), uniform=float(uniform),
    )  # fmt: skip
