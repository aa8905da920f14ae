"""Accuracy of each contender against a float64 reference, per dtype, with the rounding floor.

The input is rounded to the dtype first and the float64 reference is computed from that rounded
input, so the figures measure the computation only. The *floor* is the error of rounding the
float64 result once to the dtype: the best any implementation can return.

Values: elementwise relative error ``|approx - exact| / |exact|`` over the entries whose exact
value is a normal number of the dtype; its maximum and median. Gradients (the VJP with a random
cotangent): normwise ``max |approx - exact| / max |exact|``, because the gradient's entries are
differences that cancel and an elementwise ratio would mostly measure that cancellation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ._contenders import Target, jax_function, torch_dtype, torch_function


def host_dtype(name: str) -> Any:
    """numpy dtype for a dtype name, bfloat16 included."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def reference(op: str, x: np.ndarray, cotangent: np.ndarray, axis: int) -> tuple[Any, Any]:
    """float64 ``(output, input gradient)`` for finite inputs.

    >>> out, grad = reference("softmax", np.array([0.0, np.log(3.0)]), np.array([1.0, 0.0]), -1)
    >>> print(out.round(4), grad.round(4))
    [0.25 0.75] [ 0.1875 -0.1875]
    """
    x64 = x.astype(np.float64)
    g64 = cotangent.astype(np.float64)
    shifted = x64 - np.max(x64, axis=axis, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    probs = np.exp(log_probs)
    if op == "softmax":
        grad = probs * (g64 - np.sum(g64 * probs, axis=axis, keepdims=True))
        return probs, grad
    return log_probs, g64 - probs * np.sum(g64, axis=axis, keepdims=True)


def elementwise_relative_error(approx: Any, exact: np.ndarray, dtype: str) -> tuple[float, float]:
    """``(max, median)`` of ``|approx - exact| / |exact|`` where ``|exact|`` is a normal number.

    Non-finite outputs count as infinite error.

    >>> elementwise_relative_error(np.array([1.0, 2.2]), np.array([1.0, 2.0]), "float32")
    (0.10000000000000009, 0.050000000000000044)
    """
    approx64 = np.asarray(approx).astype(np.float64)
    tiny = float(ml_dtypes.finfo(host_dtype(dtype)).tiny)
    scored = np.abs(exact) >= tiny
    with np.errstate(invalid="ignore"):
        errors = np.abs(approx64[scored] - exact[scored]) / np.abs(exact[scored])
    errors = np.where(np.isfinite(errors), errors, np.inf)
    return float(np.max(errors)), float(np.median(errors))


def normwise_relative_error(approx: Any, exact: np.ndarray) -> float:
    """``max |approx - exact| / max |exact|`` (infinite if anything is not finite).

    >>> normwise_relative_error(np.array([1.0, -1.5]), np.array([1.0, -2.0]))
    0.25
    """
    approx64 = np.asarray(approx).astype(np.float64)
    if not np.all(np.isfinite(approx64)):
        return float("inf")
    return float(np.max(np.abs(approx64 - exact)) / max(float(np.max(np.abs(exact))), 1e-300))


def _jax_compute(name: str, op: str, axis: int, target: Target) -> Callable[..., Any]:
    function = jax_function(name, op, axis)

    def output_and_grad(x: np.ndarray, cotangent: np.ndarray, dtype: str) -> tuple[Any, Any]:
        x_dev = jax.device_put(x, target.jax_device)
        g_dev = jax.device_put(cotangent, target.jax_device)
        out, vjp = jax.vjp(function, x_dev)
        return np.asarray(out), np.asarray(vjp(g_dev)[0])

    return output_and_grad


def _torch_compute(name: str, op: str, axis: int, target: Target) -> Callable[..., Any]:
    import torch

    function = torch_function(name, op, axis)

    def output_and_grad(x: np.ndarray, cotangent: np.ndarray, dtype: str) -> tuple[Any, Any]:
        x_dev = (
            torch.from_numpy(x.astype(np.float32))
            .to(device=target.torch_device, dtype=torch_dtype(dtype))
            .requires_grad_(True)
        )
        g_dev = torch.from_numpy(cotangent.astype(np.float32)).to(
            device=target.torch_device, dtype=torch_dtype(dtype)
        )
        out = function(x_dev)
        (grad,) = torch.autograd.grad(out, x_dev, g_dev)
        as_host = host_dtype(dtype)
        return (
            out.detach().float().cpu().numpy().astype(as_host),
            grad.float().cpu().numpy().astype(as_host),
        )

    return output_and_grad


def run_accuracy(
    contenders: tuple[str, ...],
    dtypes: tuple[str, ...],
    shape: tuple[int, ...],
    target: Target,
    seed: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One row per (dtype, op, contender) plus a ``floor`` row per (dtype, op)."""
    import torch

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed + 1)
    x32 = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
    g32 = rng.standard_normal(shape, dtype=np.float32)
    axis = -1
    for dtype in dtypes:
        x = x32.astype(host_dtype(dtype))
        cotangent = g32.astype(host_dtype(dtype))
        for op in ("softmax", "log_softmax"):
            exact_out, exact_grad = reference(op, x, cotangent, axis)
            floor_max, floor_median = elementwise_relative_error(
                exact_out.astype(host_dtype(dtype)), exact_out, dtype
            )
            rows.append(
                {
                    "dtype": dtype,
                    "op": op,
                    "contender": "floor",
                    "max_rel_error": floor_max,
                    "median_rel_error": floor_median,
                    "grad_normwise_error": normwise_relative_error(
                        exact_grad.astype(host_dtype(dtype)), exact_grad
                    ),
                    "note": "float64 result rounded once to the dtype",
                }
            )
            for name in contenders:
                if name in ("torch", "torch.compile"):
                    if name == "torch.compile":
                        torch._dynamo.reset()
                    compute = _torch_compute(name, op, axis, target)
                else:
                    compute = _jax_compute(name, op, axis, target)
                try:
                    out, grad = compute(x, cotangent, dtype)
                except Exception as err:  # reported in the table, the run goes on
                    progress(f"    accuracy {name} {op} {dtype} failed: {type(err).__name__}")
                    rows.append(
                        {
                            "dtype": dtype,
                            "op": op,
                            "contender": name,
                            "max_rel_error": None,
                            "median_rel_error": None,
                            "grad_normwise_error": None,
                            "note": f"failed: {type(err).__name__}: {err}".splitlines()[0][:200],
                        }
                    )
                    continue
                max_error, median_error = elementwise_relative_error(out, exact_out, dtype)
                rows.append(
                    {
                        "dtype": dtype,
                        "op": op,
                        "contender": name,
                        "max_rel_error": max_error,
                        "median_rel_error": median_error,
                        "grad_normwise_error": normwise_relative_error(grad, exact_grad),
                        "note": "",
                    }
                )
        progress(f"  accuracy {dtype}: done")
    return rows
