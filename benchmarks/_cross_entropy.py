"""Cross-entropy from logits and integer labels: ``jsoftmax.cross_entropy`` against its peers.

Runs only when ``jsoftmax.cross_entropy`` exists. Contenders: jsoftmax; the jax.nn composite
(``log_softmax`` then a gather, under jit); optax's integer-label loss when optax is installed;
``torch.nn.functional.cross_entropy`` eagerly and under torch.compile. Passes: the mean loss
(fwd) and the loss with its gradient with respect to the logits (fwd+bwd).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax

from ._config import DTYPE_SHORT, RunConfig, compile_case, shape_label
from ._contenders import Target, torch_dtype
from ._timing import Rotation, Runner, measure, pool_size


def _jax_composite(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
    return -jnp.mean(picked.astype(jnp.float32)).astype(logits.dtype)


def _jax_losses() -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    losses: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
        "jsoftmax": partial(jsoftmax.cross_entropy, axis=-1),
        "jax.nn": _jax_composite,
    }
    try:
        import optax
    except ImportError:
        return losses

    def optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    losses["optax"] = optax_loss
    return losses


def _jax_runner(
    name: str, loss: Callable[..., Any], pass_: str, pool: list[tuple[Any, Any]]
) -> Runner:
    call = jax.jit(loss if pass_ == "fwd" else jax.value_and_grad(loss))
    entries = Rotation(pool)

    def step() -> Any:
        return call(*entries.next())

    return Runner(name, step, jax.block_until_ready)


def _torch_runner(name: str, pass_: str, pool: list[tuple[Any, Any]], target: Target) -> Runner:
    import torch
    import torch.nn.functional as functional

    loss: Callable[..., Any] = functional.cross_entropy
    if name == "torch.compile":
        torch._dynamo.reset()
        loss = torch.compile(functional.cross_entropy, dynamic=False)
    if pass_ != "fwd":
        for logits, _ in pool:
            logits.requires_grad_(True)
    entries = Rotation(pool)

    def step() -> Any:
        logits, labels = entries.next()
        value = loss(logits, labels)
        if pass_ == "fwd":
            return value
        return value, torch.autograd.grad(value, logits)[0]

    def sync(out: Any) -> None:
        if target.gpu:
            torch.cuda.synchronize()

    return Runner(name, step, sync, cuda_events=target.gpu)


def _shapes(config: RunConfig) -> tuple[tuple[int, int], ...]:
    if config.smoke:
        return ((16, 1000),)
    if config.quick:
        return ((256, 32000),)
    if config.device == "gpu":
        return ((8192, 32000), (8192, 128256), (4096, 1000))
    return ((512, 32000), (128, 128256), (4096, 1000))


def run_cross_entropy(
    config: RunConfig, target: Target, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Timings and float64 loss errors; a ``skipped`` note while the function does not exist."""
    if not hasattr(jsoftmax, "cross_entropy"):
        note = "jsoftmax.cross_entropy does not exist yet: cross-entropy section skipped"
        progress(f"  {note}")
        return {"skipped": note}
    import torch

    timings: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    losses = _jax_losses()
    # Quick runs keep float32 only, unless dtypes were asked for.
    dtypes = ("float32",) if config.quick and config.dtypes is None else config.resolved_dtypes()
    rng = np.random.default_rng(config.seed + 2)
    for shape in _shapes(config):
        host = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
        labels_host = rng.integers(0, shape[1], size=shape[0]).astype(np.int32)
        count = pool_size(host.nbytes, target.rotate_bytes)
        for dtype in dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                runners = []
                for name, loss in losses.items():
                    base = jax.device_put(host, target.jax_device).astype(jnp.dtype(dtype))
                    labels = jax.device_put(labels_host, target.jax_device)
                    pool = [(jnp.copy(base), labels) for _ in range(count)]
                    runners.append(_jax_runner(name, loss, pass_, pool))
                torch_names = ["torch"]
                if compile_case(config, shape, dtype):
                    torch_names.append("torch.compile")
                for name in torch_names:
                    base_t = torch.from_numpy(host).to(target.torch_device, torch_dtype(dtype))
                    labels_t = torch.from_numpy(labels_host.astype(np.int64)).to(
                        target.torch_device
                    )
                    pool_t = [(base_t.clone(), labels_t) for _ in range(count)]
                    runners.append(_torch_runner(name, pass_, pool_t, target))
                results, failures = measure(
                    runners,
                    budget_s=config.case_budget_s(),
                    min_rounds=config.min_rounds(),
                    max_rounds=config.max_rounds(),
                    sync_each=not target.gpu,
                    progress=progress,
                )
                for name, timing in results.items():
                    others = [t.median_s for n, t in results.items() if n != name]
                    timings.append(
                        {
                            "shape": list(shape),
                            "dtype": dtype,
                            "pass": pass_,
                            "contender": name,
                            "median_s": timing.median_s,
                            "p20_s": timing.p20_s,
                            "p80_s": timing.p80_s,
                            "rounds": len(timing.per_call_s),
                            "compile_s": timing.compile_s,
                            "ratio_to_best_other": (
                                timing.median_s / min(others) if others else None
                            ),
                        }
                    )
                for name, error in failures.items():
                    timings.append(
                        {
                            "shape": list(shape),
                            "dtype": dtype,
                            "pass": pass_,
                            "contender": name,
                            "note": error,
                        }
                    )
                progress(
                    f"  cross-entropy {DTYPE_SHORT[dtype]} {pass_} {shape_label(shape)}: "
                    + ", ".join(f"{n} {t.median_s * 1e3:.3g} ms" for n, t in results.items())
                )
    accuracy = _loss_accuracy(losses, config, target)
    return {"timings": timings, "accuracy": accuracy}


def _loss_accuracy(
    losses: dict[str, Callable[..., Any]], config: RunConfig, target: Target
) -> list[dict[str, Any]]:
    """Relative error of each mean loss against float64, per dtype, on a 256x4096 input."""
    import torch
    import torch.nn.functional as functional

    rows_count, classes = (16, 256) if config.smoke else (256, 4096)
    rng = np.random.default_rng(config.seed + 3)
    host = rng.standard_normal((rows_count, classes), dtype=np.float32) * np.float32(3.0)
    labels_host = rng.integers(0, classes, size=rows_count)
    rows = []
    for dtype in config.resolved_dtypes():
        logits_dev = jax.device_put(host, target.jax_device).astype(jnp.dtype(dtype))
        rounded = np.asarray(logits_dev.astype(jnp.float32)).astype(np.float64)
        shifted = rounded - rounded.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        exact = -np.mean(log_probs[np.arange(rows_count), labels_host])
        labels_dev = jax.device_put(labels_host.astype(np.int32), target.jax_device)
        values = {
            name: float(jax.jit(loss)(logits_dev, labels_dev)) for name, loss in losses.items()
        }
        logits_t = torch.from_numpy(host).to(target.torch_device, torch_dtype(dtype))
        values["torch"] = float(
            functional.cross_entropy(
                logits_t, torch.from_numpy(labels_host).to(target.torch_device)
            )
        )
        for name, value in values.items():
            rows.append(
                {"contender": name, "dtype": dtype, "rel_error": abs(value - exact) / exact}
            )
    return rows
