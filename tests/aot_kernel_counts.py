"""Kernel counts on an H100 and a TPU v5e, compiled ahead of time by XLA's own compilers.

Run by tests/test_accelerators.py with the interpreter of the xla-aot venv (``JSOFTMAX_AOT_PYTHON``;
it has the CUDA and TPU compiler plugins, which must never load in the test process), with
``JAX_PLATFORMS=cpu`` and the xla-aot tool folder as its first argument. Prints one JSON object:
``{case: {"jsoftmax": n, "reference": n}}``.
"""

from __future__ import annotations

import json
import sys

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
    "logsumexp": (jsoftmax.logsumexp, jax.nn.logsumexp),
}
SHAPES = ((4096, 4096), (16384, 1000), (64, 262144))
TARGETS = ("h100", "v5e")


def _count(target: str, fn, *shapes_and_dtypes) -> int:
    """Kernels launched: XLA's fusions plus custom-call kernels (a Pallas/Triton call)."""
    args = [spec(target, shape, dtype) for shape, dtype in shapes_and_dtypes]
    compiled = compile_for(jax.jit(fn), *args)
    hlo = compiled.as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    launched = sum(1 for line in entry.splitlines() if "custom-call(" in line and "triton" in line)
    return len(fusions(compiled)) + launched


def _cases():
    for target in TARGETS:
        for name, (ours, reference) in OPS.items():
            for dtype in ("float32", "bfloat16"):
                for shape in SHAPES:
                    for masked in (False, True):
                        for grad in (False, True):
                            yield target, name, ours, reference, dtype, shape, masked, grad
        if optax is not None:
            yield target, "cross_entropy", None, None, "float32", (4096, 32000), False, False
            yield target, "cross_entropy", None, None, "float32", (4096, 32000), False, True


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


def main() -> int:
    results = {}
    for target, name, ours, reference, dtype, shape, masked, grad in _cases():
        key = f"{target}/{name}/{'grad' if grad else 'fwd'}/{dtype}/{'x'.join(map(str, shape))}"
        key += "/where" if masked else ""
        if name == "cross_entropy":

            def mean_optax(x, labels):
                return optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()

            pair = (jsoftmax.cross_entropy, mean_optax)
            if grad:
                pair = tuple(jax.grad(fn) for fn in pair)
            args = ((shape, jnp.float32), ((shape[0],), jnp.int32))
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
