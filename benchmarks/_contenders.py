"""The contenders of a softmax case, and the copy rows, each prepared as a :class:`Runner`.

JAX contenders run under ``jax.jit`` as a model calls them, except ``jnp-naive``: the textbook
formula op by op, unfused. Torch runs eagerly or under ``torch.compile(dynamic=False)``. All get
the same values: one pool of input copies per framework, rotated call by call.

Passes: ``fwd`` the function alone; ``bwd`` the backward alone, from state saved once per input
(a jitted ``jax.vjp``; a torch graph kept with ``retain_graph=True``); ``fwd+bwd`` one call
returning the output and the input gradient.
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

from ._measure import Rotation, Runner, pool_size
from ._plan import HEADLINE_SHAPES, Case


def naive_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """The textbook formula.

    >>> print(naive_softmax(jnp.array([0.0, jnp.log(3.0)])).round(4))
    [0.25 0.75]
    """
    exp = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return exp / jnp.sum(exp, axis=axis, keepdims=True)


def naive_log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    shifted = x - jnp.max(x, axis=axis, keepdims=True)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def jax_function(name: str, op: str, axis: int) -> Callable[[jax.Array], jax.Array]:
    """The un-jitted function of a JAX contender."""
    if name in ("jnp-naive", "xla-fused"):
        return partial(naive_softmax if op == "softmax" else naive_log_softmax, axis=axis)
    module = {"jsoftmax": jsoftmax, "jax.nn": jax.nn}[name]
    return partial(getattr(module, op), axis=axis)


def torch_function(name: str, op: str, dim: int) -> Callable[[Any], Any]:
    import torch

    base = torch.softmax if op == "softmax" else torch.log_softmax

    def eager(x: Any) -> Any:
        return base(x, dim)

    if name == "torch.compile":
        torch._dynamo.reset()  # fresh caches: no recompile limit, one kernel per case
        return torch.compile(eager, dynamic=False)
    return eager


@dataclasses.dataclass
class Target:
    """Where a run executes, and how many bytes of inputs each framework rotates through."""

    gpu: bool
    jax_device: Any
    torch_device: Any  # None without torch
    rotate_bytes: int


def make_target(device: str, has_torch: bool) -> Target:
    """Raises RuntimeError with a clear message when ``device="gpu"`` has no CUDA GPU."""
    torch = __import__("torch") if has_torch else None
    if device == "gpu":
        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError:
            jax_device = None
        if jax_device is None or (torch is not None and not torch.cuda.is_available()):
            raise RuntimeError(f"--device gpu expected a CUDA GPU, got {jax.devices()}")
        l2 = 50 * 2**20
        if torch is not None:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or l2
        return Target(True, jax_device, torch and torch.device("cuda"), max(2 * l2, 128 * 2**20))
    return Target(False, jax.devices("cpu")[0], torch and torch.device("cpu"), 64 * 2**20)


def torch_sync(target: Target) -> Callable[[Any], None]:
    if not target.gpu:
        return lambda out: None  # torch on CPU returns when the result is there
    import torch

    return lambda out: torch.cuda.synchronize()


class Inputs:
    """The values of one case, made once per framework: a pool of ``(x, cotangent)`` pairs."""

    def __init__(self, case: Case, target: Target, seed: int) -> None:
        rng = np.random.default_rng(seed)
        # Logits of spread 3: exp() neither overflows nor flushes to zero.
        self.x = rng.standard_normal(case.shape, dtype=np.float32) * np.float32(3.0)
        self.g = rng.standard_normal(case.shape, dtype=np.float32)
        entry = case.size * jnp.dtype(case.dtype).itemsize * (1 if case.pass_ == "fwd" else 3)
        self.count = pool_size(entry, target.rotate_bytes)
        self.case, self.target = case, target
        self._pools: dict[str, list[tuple[Any, Any]]] = {}

    def jax(self) -> list[tuple[jax.Array, jax.Array | None]]:
        if "jax" not in self._pools:
            put = partial(jax.device_put, device=self.target.jax_device)
            x = put(self.x).astype(self.case.dtype)
            g = None if self.case.pass_ == "fwd" else put(self.g).astype(self.case.dtype)
            # Explicit copies: device_put may alias host memory, and each entry needs its own.
            pool = [(jnp.copy(x), None if g is None else jnp.copy(g)) for _ in range(self.count)]
            self._pools["jax"] = pool
        return self._pools["jax"]

    def torch(self) -> list[tuple[Any, Any]]:
        if "torch" not in self._pools:
            import torch

            dtype, grad = getattr(torch, self.case.dtype), self.case.pass_ != "fwd"
            x = torch.from_numpy(self.x).to(self.target.torch_device, dtype)
            g = torch.from_numpy(self.g).to(self.target.torch_device, dtype) if grad else None
            copies = [(x.clone(), None if g is None else g.clone()) for _ in range(self.count)]
            self._pools["torch"] = [(x.requires_grad_(grad), g) for x, g in copies]
        return self._pools["torch"]


def _jax_memory(jitted: Any, *args: Any) -> int | None:
    """Outputs plus temporaries of a jitted call, from XLA's memory analysis."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
        return int(
            stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it
        return None


def _vjp(function: Callable[..., Any], x: Any, g: Any) -> tuple[Any, Any]:
    out, pullback = jax.vjp(function, x)
    return out, pullback(g)[0]


def jax_runner(name: str, case: Case, inputs: Inputs) -> Runner:
    function = jax_function(name, case.op, case.axis)
    jit = jax.jit if name != "jnp-naive" else (lambda f: f)
    pairs = inputs.jax()
    args: list[tuple[Any, ...]]
    if case.pass_ == "bwd":
        # Saved under jit, every pool entry's VJP has one tree structure, so the jitted backward
        # takes the residual arrays as arguments and traces once.
        vjps = [jit(lambda x: jax.vjp(function, x)[1])(x) for x, _ in pairs]
        tree = jax.tree_util.tree_structure(vjps[0])
        call = jit(lambda leaves, g: jax.tree_util.tree_unflatten(tree, leaves)(g)[0])
        args = [
            (jax.tree_util.tree_leaves(vjp), g) for vjp, (_, g) in zip(vjps, pairs, strict=True)
        ]
    elif case.pass_ == "fwd":
        call, args = jit(function), [(x,) for x, _ in pairs]
    else:
        call, args = jit(partial(_vjp, function)), pairs
    rotation = Rotation(args)
    extra = {}
    if name != "jnp-naive" and case.dtype == "float32" and case.shape in HEADLINE_SHAPES:
        extra["peak_extra_bytes"] = _jax_memory(call, *args[0])
    return Runner(
        name, lambda: call(*rotation.next()), jax.block_until_ready, False, len(args), extra
    )


def torch_runner(name: str, case: Case, inputs: Inputs) -> Runner:
    import torch

    function = torch_function(name, case.op, case.axis)
    pairs = inputs.torch()
    if case.pass_ == "fwd":
        rotation = Rotation([x for x, _ in pairs])
        step: Callable[[], Any] = lambda: function(rotation.next())  # noqa: E731
    elif case.pass_ == "bwd":
        saved = Rotation([(function(x), x, g) for x, g in pairs])

        def step() -> Any:
            out, x, g = saved.next()
            return torch.autograd.grad(out, x, g, retain_graph=True)

    else:
        rotation = Rotation(pairs)

        def step() -> Any:
            x, g = rotation.next()
            out = function(x)
            return out, torch.autograd.grad(out, x, g)[0]

    return Runner(name, step, torch_sync(inputs.target), inputs.target.gpu, len(pairs))


def copy_runner(name: str, case: Case, inputs: Inputs) -> Runner:
    """A device copy of the input: the bandwidth reference of the same run (2 x size bytes).

    ``copy:torch`` is ``dst.copy_(src)`` into a preallocated tensor; ``copy:jax`` negates into
    the donated input buffer, in place, so neither touches fresh pages.
    """
    if name == "copy:torch":
        pairs = Rotation([(x.detach(), x.detach().clone()) for x, _ in inputs.torch()])
        step = lambda: (lambda src, dst: dst.copy_(src))(*pairs.next())  # noqa: E731
        return Runner(name, step, torch_sync(inputs.target), inputs.target.gpu, inputs.count)
    negate = jax.jit(jnp.negative, donate_argnums=0)
    buffers = [jnp.copy(x) for x, _ in inputs.jax()]
    index = [-1]

    def donate() -> Any:
        index[0] = (index[0] + 1) % len(buffers)
        buffers[index[0]] = negate(buffers[index[0]])
        return buffers[index[0]]

    return Runner(name, donate, jax.block_until_ready, False, len(buffers))


def make_runner(name: str, case: Case, inputs: Inputs) -> Runner:
    if name.startswith("copy:"):
        return copy_runner(name, case, inputs)
    if name.startswith("torch"):
        return torch_runner(name, case, inputs)
    return jax_runner(name, case, inputs)
