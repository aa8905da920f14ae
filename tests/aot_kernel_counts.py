"""Kernel counts on an H100 and a TPU v5e, compiled ahead of time by XLA's own compilers.

Run by tests/test_accelerators.py with the interpreter of the xla-aot venv (``JSOFTMAX_AOT_PYTHON``;
it has the CUDA and TPU compiler plugins, which must never load in the test process), with
``JAX_PLATFORMS=cpu`` and the xla-aot tool folder as its first argument (a second argument keeps
the cases whose key contains it). Prints one JSON object: ``{case: {"jsoftmax": n, "reference":
n}}``.
"""

from __future__ import annotations

import json
import sys
from functools import partial

sys.path.insert(0, sys.argv[1])

import jax
import jax.numpy as jnp
import numpy as np
from aot import compile_for, fusions, spec

import jsoftmax

try:
    import optax
except ImportError:  # the reference for cross_entropy only
    optax = None

OPS = {
    "softmax": (jsoftmax.softmax, jax.nn.softmax),
    "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax),
    # jax.nn.logsumexp reduces every axis by default; jsoftmax's default is the last one.
    "logsumexp": (jsoftmax.logsumexp, partial(jax.nn.logsumexp, axis=-1)),
}
SHAPES = ((4096, 4096), (16384, 1000), (64, 262144))
TARGETS = ("h100", "v5e")
CE_SHAPE = (4096, 32000)


def _count(target: str, fn, *shapes_and_dtypes) -> int:
    """Kernels launched: XLA's fusions plus custom-call kernels (a Pallas/Triton call)."""
    args = [spec(target, shape, dtype) for shape, dtype in shapes_and_dtypes]
    compiled = compile_for(jax.jit(fn), *args)
    hlo = compiled.as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    launched = sum(1 for line in entry.splitlines() if "custom-call(" in line and "triton" in line)
    return len(fusions(compiled)) + launched


def _cases():
    # float16 behaves as bfloat16 (computed in float32, rounded once): one shape checks it.
    dtype_shapes = [(d, s) for d in ("float32", "bfloat16") for s in SHAPES]
    dtype_shapes.append(("float16", SHAPES[0]))
    for target in TARGETS:
        for name, (ours, reference) in OPS.items():
            for dtype, shape in dtype_shapes:
                for masked in (False, True):
                    for grad in (False, True):
                        yield target, name, ours, reference, dtype, shape, masked, grad
        if optax is not None:
            for dtype in ("float32", "bfloat16"):
                for masked in (False, True):
                    for grad in (False, True):
                        yield target, "cross_entropy", None, None, dtype, CE_SHAPE, masked, grad


def _functions(ours, reference, masked: bool, grad: bool):
    def wrap(fn):
        if masked:
            return lambda x, mask, g: fn(x, where=mask)
        return lambda x, mask, g: fn(x)

    def loss(fn):
        # The gradient of sum(f(x) * g), as the accelerator tool measures it.
        return jax.grad(lambda x, mask, g: jnp.sum(fn(x, mask, g) * g).astype(jnp.float32))

    pair = (wrap(ours), wrap(reference))
    return tuple(loss(fn) for fn in pair) if grad else pair


def _cross_entropy_functions(masked: bool, grad: bool):
    """jsoftmax.cross_entropy and optax's integer-label loss, mean-reduced; ``where=`` masks
    logits (both libraries: a masked logit is left out of the normaliser)."""

    def ours(x, labels, mask):
        return jsoftmax.cross_entropy(x, labels, where=mask if masked else None)

    def reference(x, labels, mask):
        losses = optax.softmax_cross_entropy_with_integer_labels(
            x, labels, where=mask if masked else None
        )
        return losses.mean()

    if grad:
        return jax.grad(ours), jax.grad(reference)
    return ours, reference


def main() -> int:
    results = {}
    for target, name, ours, reference, dtype, shape, masked, grad in _cases():
        key = f"{target}/{name}/{'grad' if grad else 'fwd'}/{dtype}/{'x'.join(map(str, shape))}"
        key += "/where" if masked else ""
        if len(sys.argv) > 2 and sys.argv[2] not in key:
            continue
        if name == "cross_entropy":
            pair = _cross_entropy_functions(masked, grad)
            args = ((shape, jnp.dtype(dtype)), ((shape[0],), jnp.int32), (shape, np.bool_))
        else:
            pair = _functions(ours, reference, masked, grad)
            out_shape = shape[:1] if name == "logsumexp" else shape
            args = ((shape, jnp.dtype(dtype)), (shape, np.bool_), (out_shape, jnp.dtype(dtype)))
        results[key] = {
            "jsoftmax": _count(target, pair[0], *args),
            "reference": _count(target, pair[1], *args),
        }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
