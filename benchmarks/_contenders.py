"""The contenders and the copy reference rows, each prepared as a :class:`Runner` for one case.

JAX contenders (``jsoftmax``, ``jax.nn``, ``xla-fused``) are called through ``jax.jit`` the way a
model calls them; ``jnp-naive`` is the textbook formula run op by op, unfused. Torch contenders
run eagerly or under ``torch.compile``. Every contender gets the same values (from one float32
host array, cast to the case's dtype) in its own pool of copies that is rotated call by call.

Passes:
  fwd: the function alone, no autodiff state.
  bwd: the backward alone, from state saved once per pool entry: the function returned by
    ``jax.vjp`` (applied under ``jax.jit``), or a torch graph kept with ``retain_graph=True``.
  fwd+bwd: forward and backward in one call, returning both the output and the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax

from ._config import Case
from ._timing import Rotation, Runner, pool_size


def naive_softmax(x: jax.Array, axis: int) -> jax.Array:
    """The textbook formula: one jnp operation after another.

    >>> print(naive_softmax(jnp.array([0.0, jnp.log(3.0)]), axis=-1).round(4))
    [0.25 0.75]
    """
    shifted = x - jnp.max(x, axis=axis, keepdims=True)
    exp = jnp.exp(shifted)
    return exp / jnp.sum(exp, axis=axis, keepdims=True)


def naive_log_softmax(x: jax.Array, axis: int) -> jax.Array:
    """The textbook formula for log_softmax, one jnp operation after another.

    >>> print(naive_log_softmax(jnp.array([0.0, 0.0]), axis=-1).round(4))
    [-0.6931 -0.6931]
    """
    shifted = x - jnp.max(x, axis=axis, keepdims=True)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


_NAIVE = {"softmax": naive_softmax, "log_softmax": naive_log_softmax}


def jax_function(name: str, op: str, axis: int) -> Callable[[jax.Array], jax.Array]:
    """The un-jitted function a JAX contender computes."""
    if name == "jsoftmax":
        return partial(getattr(jsoftmax, op), axis=axis)
    if name == "jax.nn":
        return partial(getattr(jax.nn, op), axis=axis)
    if name in ("jnp-naive", "xla-fused"):
        return partial(_NAIVE[op], axis=axis)
    raise ValueError(f"benchmarks: contender expected a JAX contender, got {name!r}")


@dataclasses.dataclass
class Target:
    """Where a run executes: the JAX device, the torch device and how to synchronise."""

    kind: str  # "cpu" or "gpu"
    jax_device: Any
    torch_device: Any
    rotate_bytes: int

    @property
    def gpu(self) -> bool:
        return self.kind == "gpu"


class DeviceUnavailable(RuntimeError):
    """The requested device is not there (``--device gpu`` without a CUDA GPU)."""


def make_target(kind: str, llc_bytes: int | None) -> Target:
    """The devices for ``--device cpu|gpu``; raises DeviceUnavailable if the GPU is missing."""
    import torch

    if kind == "gpu":
        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError:
            jax_device = None
        if jax_device is None or not torch.cuda.is_available():
            raise DeviceUnavailable(
                "benchmarks: --device gpu expected a CUDA GPU visible to jax and torch, got "
                f"jax devices {jax.devices()} and torch.cuda.is_available() "
                f"{torch.cuda.is_available()}"
            )
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
        return Target("gpu", jax_device, torch.device("cuda"), max(2 * l2_bytes, 128 * 2**20))
    if kind != "cpu":
        raise ValueError(f"benchmarks: --device expected cpu or gpu, got {kind!r}")
    cache = llc_bytes or 32 * 2**20
    return Target("cpu", jax.devices("cpu")[0], torch.device("cpu"), max(2 * cache, 64 * 2**20))


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclasses.dataclass
class CaseData:
    """The values every contender of a case computes on, on the host, in float32."""

    x: np.ndarray
    cotangent: np.ndarray
    pool: int

    @classmethod
    def create(cls, case: Case, rotate_bytes: int, seed: int) -> CaseData:
        rng = np.random.default_rng(seed)
        # Logits of spread 3, as in the tests: exp() neither overflows nor flushes to zero.
        x = rng.standard_normal(case.shape, dtype=np.float32) * np.float32(3.0)
        cotangent = rng.standard_normal(case.shape, dtype=np.float32)
        # One pool entry: the input, plus the cotangent and saved output for the backward.
        entry_bytes = case.size * jnp.dtype(case.dtype).itemsize
        if case.pass_ != "fwd":
            entry_bytes *= 3
        return cls(x, cotangent, pool_size(entry_bytes, rotate_bytes))


def _jax_pool(host: np.ndarray, dtype: str, count: int, target: Target) -> list[jax.Array]:
    base = jax.device_put(host, target.jax_device).astype(jnp.dtype(dtype))
    # Explicit copies: device_put may alias host memory, and each entry needs its own buffer.
    return [jnp.copy(base) for _ in range(count)]


def _torch_pool(host: np.ndarray, dtype: str, count: int, target: Target) -> list[Any]:
    import torch

    base = torch.from_numpy(host).to(device=target.torch_device, dtype=torch_dtype(dtype))
    return [base.clone() for _ in range(count)]


def _jax_extra_bytes(jitted: Any, *args: Any) -> int | None:
    """Outputs plus temporaries of a jitted call, from XLA's memory analysis of its executable."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # not every backend or version reports it
        return None
    if stats is None:
        return None
    return int(stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _jax_sync(out: Any) -> None:
    jax.block_until_ready(out)


def jax_runner(name: str, case: Case, data: CaseData, target: Target) -> Runner:
    """A JAX contender prepared for ``case``."""
    function = jax_function(name, case.op, case.axis)
    jitted = name != "jnp-naive"
    xs = _jax_pool(data.x, case.dtype, data.pool, target)
    measure_peak: Callable[[], int | None] | None
    if case.pass_ == "fwd":
        call = jax.jit(function) if jitted else function
        inputs = Rotation(xs)

        def step() -> Any:
            return call(inputs.next())

        measure_peak = partial(_jax_extra_bytes, call, xs[0]) if jitted else None
    else:
        cotangents = _jax_pool(data.cotangent, case.dtype, data.pool, target)
        if case.pass_ == "bwd":
            if jitted:
                # Saved under jit, every pool entry's VJP has one tree structure; the jitted
                # backward takes the residual arrays as arguments (not compiled constants) and
                # rebuilds the VJP from that structure, so it traces once and its call is a
                # plain array call.
                save_vjp = jax.jit(partial(_saved_vjp, function))
                vjps = [save_vjp(x) for x in xs]
                structure = jax.tree_util.tree_structure(vjps[0])
                backward: Callable[..., Any] = jax.jit(partial(_apply_flat_vjp, structure))
                saved: list[tuple[Any, ...]] = [
                    (jax.tree_util.tree_leaves(vjp), g)
                    for vjp, g in zip(vjps, cotangents, strict=True)
                ]
                del vjps
            else:
                backward = _apply_vjp
                saved = [(_saved_vjp(function, x), g) for x, g in zip(xs, cotangents, strict=True)]
            del xs
            entries = Rotation(saved)

            def step() -> Any:
                return backward(*entries.next())

            measure_peak = partial(_jax_extra_bytes, backward, *saved[0]) if jitted else None
        else:
            fwd_bwd = partial(_forward_backward, function)
            call_both: Callable[..., Any] = jax.jit(fwd_bwd) if jitted else fwd_bwd
            pairs = Rotation(list(zip(xs, cotangents, strict=True)))

            def step() -> Any:
                return call_both(*pairs.next())

            measure_peak = (
                partial(_jax_extra_bytes, call_both, xs[0], cotangents[0]) if jitted else None
            )
    return Runner(name, step, _jax_sync, peak_probe=measure_peak, warmup_calls=data.pool)


def _saved_vjp(function: Callable[[jax.Array], jax.Array], x: jax.Array) -> Any:
    return jax.vjp(function, x)[1]


def _apply_vjp(vjp_function: Any, cotangent: jax.Array) -> jax.Array:
    return vjp_function(cotangent)[0]


def _apply_flat_vjp(structure: Any, residuals: list[Any], cotangent: jax.Array) -> jax.Array:
    return jax.tree_util.tree_unflatten(structure, residuals)(cotangent)[0]


def _forward_backward(
    function: Callable[[jax.Array], jax.Array], x: jax.Array, cotangent: jax.Array
) -> tuple[jax.Array, jax.Array]:
    out, vjp_function = jax.vjp(function, x)
    return out, vjp_function(cotangent)[0]


def torch_function(name: str, op: str, dim: int) -> Callable[[Any], Any]:
    """The torch contender's callable (compiled afresh for each case under torch.compile)."""
    import torch

    base = torch.softmax if op == "softmax" else torch.log_softmax

    def eager(x: Any) -> Any:
        return base(x, dim)

    if name == "torch":
        return eager
    if name == "torch.compile":
        # Static shapes: one specialised kernel per case, as a model with fixed shapes gets.
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"benchmarks: contender expected a torch contender, got {name!r}")


def _torch_sync(target: Target) -> Callable[[Any], None]:
    if not target.gpu:
        return lambda out: None  # torch on CPU returns when the result is there
    import torch

    return lambda out: torch.cuda.synchronize()


def _torch_peak_probe(step: Callable[[], Any]) -> int | None:
    """Extra CUDA memory one call allocates (outputs and temporaries) beyond what it starts with."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def torch_runner(name: str, case: Case, data: CaseData, target: Target) -> Runner:
    """A torch contender prepared for ``case``."""
    import torch

    if name == "torch.compile":
        torch._dynamo.reset()  # fresh caches: no recompile limit, no shape generalisation
    function = torch_function(name, case.op, case.axis)
    xs = _torch_pool(data.x, case.dtype, data.pool, target)
    if case.pass_ == "fwd":
        inputs = Rotation(xs)

        def step() -> Any:
            return function(inputs.next())

    else:
        cotangents = _torch_pool(data.cotangent, case.dtype, data.pool, target)
        for x in xs:
            x.requires_grad_(True)
        if case.pass_ == "bwd":
            saved = Rotation([(function(x), x, g) for x, g in zip(xs, cotangents, strict=True)])

            def step() -> Any:
                out, x, g = saved.next()
                return torch.autograd.grad(out, x, g, retain_graph=True)

        else:
            pairs = Rotation(list(zip(xs, cotangents, strict=True)))

            def step() -> Any:
                x, g = pairs.next()
                out = function(x)
                return out, torch.autograd.grad(out, x, g)[0]

    probe = partial(_torch_peak_probe, step) if target.gpu else None
    return Runner(
        name,
        step,
        _torch_sync(target),
        cuda_events=target.gpu,
        peak_probe=probe,
        warmup_calls=data.pool,
    )


def copy_runner(name: str, case: Case, data: CaseData, target: Target) -> Runner:
    """A device copy of the case's input: the bandwidth reference of the same run.

    ``copy:torch`` is ``dst.copy_(src)`` into a preallocated tensor; ``copy:jax`` negates into
    the donated input buffer (in place, so no fresh pages are touched). Both read and write the
    input's size once: 2 x size bytes.
    """
    if name == "copy:torch":
        # Source and destination both rotate: half as many pairs cover the same bytes.
        sources = _torch_pool(data.x, case.dtype, max(1, data.pool // 2), target)
        pairs = Rotation([(src, src.clone()) for src in sources])

        def step() -> Any:
            src, dst = pairs.next()
            return dst.copy_(src)

        runner = Runner(
            name, step, _torch_sync(target), cuda_events=target.gpu, warmup_calls=data.pool
        )
    elif name == "copy:jax":
        negate = jax.jit(jnp.negative, donate_argnums=0)
        buffers = Rotation(_jax_pool(data.x, case.dtype, data.pool, target))

        def step() -> Any:
            out = negate(buffers.next())
            buffers.replace_current(out)
            return out

        runner = Runner(name, step, _jax_sync, warmup_calls=data.pool)
    else:
        raise ValueError(f"benchmarks: copy row expected copy:torch or copy:jax, got {name!r}")
    return runner


def make_runner(name: str, case: Case, data: CaseData, target: Target) -> Runner:
    """The runner for a contender or copy row."""
    if name.startswith("copy:"):
        return copy_runner(name, case, data, target)
    if name in ("torch", "torch.compile"):
        return torch_runner(name, case, data, target)
    return jax_runner(name, case, data, target)
