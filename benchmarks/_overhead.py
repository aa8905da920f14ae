"""Per-call overhead on a tiny input, where the arithmetic is negligible.

The main tables call every JAX contender inside ``jax.jit``, the way a model does. Code that
calls ``jsoftmax.softmax`` directly also pays its argument checks in Python on every call; this
section shows that cost next to ``jax.nn.softmax`` (itself jitted) and ``torch.softmax``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np

import jsoftmax

from ._config import RunConfig
from ._contenders import Target
from ._timing import Runner, measure

TINY_SHAPE = (8, 128)


def run_overhead(
    config: RunConfig, target: Target, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One row per way of calling softmax on an 8x128 float32 input."""
    import torch

    host = np.random.default_rng(0).standard_normal(TINY_SHAPE, dtype=np.float32)
    array = jax.device_put(host, target.jax_device)
    tensor = torch.from_numpy(host).to(target.torch_device)
    jitted = jax.jit(partial(jsoftmax.softmax, axis=-1))

    def torch_sync(out: Any) -> None:
        if target.gpu:
            torch.cuda.synchronize()

    runners = [
        Runner("jsoftmax.softmax(x)", lambda: jsoftmax.softmax(array), jax.block_until_ready),
        Runner("jax.jit(jsoftmax.softmax)(x)", lambda: jitted(array), jax.block_until_ready),
        Runner("jax.nn.softmax(x)", lambda: jax.nn.softmax(array), jax.block_until_ready),
        Runner("torch.softmax(x, -1)", lambda: torch.softmax(tensor, -1), torch_sync),
    ]
    timings, failures = measure(
        runners,
        budget_s=config.extra_budget_s(),
        min_rounds=config.min_rounds(),
        max_rounds=config.max_rounds(),
        sync_each=True,
        progress=progress,
    )
    rows: list[dict[str, Any]] = [
        {
            "call": name,
            "shape": list(TINY_SHAPE),
            "median_s": timing.median_s,
            "p20_s": timing.p20_s,
            "p80_s": timing.p80_s,
            "rounds": len(timing.per_call_s),
            "note": "",
        }
        for name, timing in timings.items()
    ]
    rows += [
        {"call": name, "shape": list(TINY_SHAPE), "note": error} for name, error in failures.items()
    ]
    progress(
        "  overhead 8x128: "
        + ", ".join(f"{name} {t.median_s * 1e6:.1f} us" for name, t in timings.items())
    )
    return rows
