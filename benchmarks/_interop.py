"""The torch bridge: conversion time against size, and ``jsoftmax.interop`` against torch.

``from_torch`` / ``to_torch`` share memory, so their time should not grow with the tensor; the
``copy=True`` rows show what a copy would cost instead. ``jsoftmax.interop.softmax`` runs
jsoftmax's JAX code on torch tensors; it is timed against ``torch.softmax`` on the same tensors,
forward and forward+backward, interleaved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._config import RunConfig, shape_label
from ._contenders import Target
from ._timing import Rotation, Runner, measure, pool_size

REQUIRED_NAMES = ("from_torch", "to_torch", "softmax", "log_softmax")


def load_interop() -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, why not)`` when the bridge lacks the names timed here."""
    try:
        import jsoftmax.interop as interop
    except ImportError as err:
        return None, f"jsoftmax.interop could not be imported ({err})"
    missing = [name for name in REQUIRED_NAMES if not hasattr(interop, name)]
    if missing:
        return None, f"jsoftmax.interop lacks {', '.join(missing)}: interop section skipped"
    return interop, None


def _conversion_runners(interop: Any, elements: int, target: Target) -> list[Runner]:
    import torch

    host = np.random.default_rng(0).standard_normal(elements, dtype=np.float32)
    tensor = torch.from_numpy(host).to(target.torch_device).clone()
    array = interop.from_torch(tensor.clone(), copy=True)

    def torch_sync(out: Any) -> None:
        if target.gpu:
            torch.cuda.synchronize()

    return [
        Runner("from_torch", lambda: interop.from_torch(tensor), jax.block_until_ready),
        Runner(
            "from_torch(copy=True)",
            lambda: interop.from_torch(tensor, copy=True),
            jax.block_until_ready,
        ),
        Runner("to_torch", lambda: interop.to_torch(array), torch_sync),
        Runner("to_torch(copy=True)", lambda: interop.to_torch(array, copy=True), torch_sync),
    ]


def _softmax_runners(
    interop: Any, op: str, shape: tuple[int, ...], pass_: str, target: Target
) -> list[Runner]:
    import torch

    rng = np.random.default_rng(0)
    host = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
    cotangent_host = rng.standard_normal(shape, dtype=np.float32)
    count = pool_size(host.nbytes * (1 if pass_ == "fwd" else 3), target.rotate_bytes)
    functions: dict[str, Callable[..., Any]] = {
        "jsoftmax.interop": getattr(interop, op),
        "torch": getattr(torch, op),
    }

    def sync(out: Any) -> None:
        if target.gpu:
            torch.cuda.synchronize()

    runners = []
    for name, function in functions.items():
        xs = [torch.from_numpy(host).to(target.torch_device).clone() for _ in range(count)]
        cotangent = torch.from_numpy(cotangent_host).to(target.torch_device)
        step = _bridged_step(function, pass_, xs, cotangent)
        runners.append(Runner(name, step, sync, cuda_events=target.gpu, warmup_calls=count))
    return runners


def _bridged_step(
    function: Callable[..., Any], pass_: str, xs: list[Any], cotangent: Any
) -> Callable[[], Any]:
    """One call of ``function(x, -1)`` (fwd) or of it and its gradient (fwd+bwd), rotating."""
    import torch

    if pass_ == "fwd":
        inputs = Rotation(xs)
        return lambda: function(inputs.next(), -1)
    pairs = Rotation([(x.requires_grad_(True), cotangent.clone()) for x in xs])

    def forward_backward() -> Any:
        x, g = pairs.next()
        out = function(x, -1)
        return out, torch.autograd.grad(out, x, g)[0]

    return forward_backward


def run_interop(
    config: RunConfig, target: Target, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Conversion and bridged-softmax timings; a ``skipped`` note if the bridge is missing."""
    interop, why_not = load_interop()
    if interop is None:
        progress(f"  {why_not}")
        return {"skipped": why_not}
    sync_each = not target.gpu
    conversions: list[dict[str, Any]] = []
    if config.smoke:
        exponents: tuple[int, ...] = (8, 12)
    else:
        exponents = (10, 16, 22) if config.quick else (10, 14, 18, 22, 26)
    budget_s = config.extra_budget_s()
    min_rounds, max_rounds = config.min_rounds(), config.max_rounds()
    for exponent in exponents:
        elements = 2**exponent
        timings, failures = measure(
            _conversion_runners(interop, elements, target),
            budget_s=budget_s,
            min_rounds=min_rounds,
            max_rounds=max_rounds,
            sync_each=sync_each,
            progress=progress,
        )
        for name, timing in timings.items():
            conversions.append(
                {
                    "function": name,
                    "elements": elements,
                    "bytes": elements * 4,
                    "median_s": timing.median_s,
                    "p20_s": timing.p20_s,
                    "p80_s": timing.p80_s,
                    "rounds": len(timing.per_call_s),
                    "note": "",
                }
            )
        for name, error in failures.items():
            conversions.append({"function": name, "elements": elements, "note": error})
        progress(
            f"  interop conversions, 2^{exponent} float32: "
            + ", ".join(f"{name} {t.median_s * 1e6:.1f} us" for name, t in timings.items())
        )
    bridged: list[dict[str, Any]] = []
    shapes: tuple[tuple[int, ...], ...] = ((64, 4096), (1024, 4096), (4096, 4096))
    if config.smoke:
        shapes = ((8, 256),)
    elif config.quick:
        shapes = ((64, 4096), (1024, 4096))
    for op in ("softmax", "log_softmax"):
        for shape in shapes:
            for pass_ in ("fwd", "fwd+bwd"):
                timings, failures = measure(
                    _softmax_runners(interop, op, shape, pass_, target),
                    budget_s=budget_s,
                    min_rounds=min_rounds,
                    max_rounds=max_rounds,
                    sync_each=sync_each,
                    progress=progress,
                )
                torch_time = timings["torch"].median_s if "torch" in timings else None
                for name, timing in timings.items():
                    bridged.append(
                        {
                            "op": op,
                            "shape": list(shape),
                            "pass": pass_,
                            "function": name,
                            "median_s": timing.median_s,
                            "p20_s": timing.p20_s,
                            "p80_s": timing.p80_s,
                            "rounds": len(timing.per_call_s),
                            "ratio_to_torch": (
                                timing.median_s / torch_time if torch_time else None
                            ),
                            "note": "",
                        }
                    )
                for name, error in failures.items():
                    bridged.append(
                        {
                            "op": op,
                            "shape": list(shape),
                            "pass": pass_,
                            "function": name,
                            "note": error,
                        }
                    )
                progress(
                    f"  interop {op} {pass_} {shape_label(shape)}: "
                    + ", ".join(f"{n} {t.median_s * 1e3:.3f} ms" for n, t in timings.items())
                )
    return {"conversions": conversions, "softmax": bridged}
