"""Shared test helpers: float64 host references and the per-dtype tolerance table."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

# (rtol, atol) per dtype for values; gradients get GRAD_SCALE times looser tolerances.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-14),
    "float32": (2e-6, 3e-7),  # log_softmax near 0: log(sum) is off by ~ulp(1) = 1.2e-7
    "bfloat16": (1e-2, 1e-3),
    "float16": (2e-3, 1e-4),
}
GRAD_SCALE = 10.0

FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")


def tolerance(dtype: Any, *, grad: bool = False) -> dict[str, float]:
    """Keyword arguments for ``np.testing.assert_allclose`` at ``dtype``."""
    rtol, atol = TOLERANCES[np.dtype(dtype).name]
    scale = GRAD_SCALE if grad else 1.0
    return {"rtol": rtol * scale, "atol": atol * scale}


def to_f64(array: Any) -> np.ndarray:
    """Any array (jax, numpy, bf16 included) as a float64 numpy array on the host."""
    return np.asarray(np.asarray(array).astype(np.float64))


def np_dtype(name: str) -> Any:
    """numpy dtype for a name, bf16 included."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def reverse_kernel(
    name: str, dtype: Any, *, masked: bool = False, suffix: str = "", output_used: bool = True
) -> str:
    """The CPU backward kernel a jitted reverse pass runs for ``name`` (softmax or log_softmax):
    from the output where it is used, masked or in 16-bit storage; from the input for an
    unmasked float32 call whose output is dead (a gradient alone)."""
    from_input = not masked and jnp.dtype(dtype).itemsize >= 4 and not output_used
    return f"jsoftmax_{name}_bwd{'_from_input' if from_input else ''}{suffix}"


def random_logits(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0, scale=3.0):
    """Deterministic normal logits as a jax array of ``dtype``."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _masked_f64(x: Any, axis: Any, where: Any) -> tuple[np.ndarray, Any]:
    x64 = to_f64(x)
    if where is not None:
        x64 = np.where(np.broadcast_to(np.asarray(where), x64.shape), x64, -np.inf)
    return x64, axis


def ref_logsumexp(x: Any, axis: Any = -1, where: Any = None, keepdims: bool = False) -> np.ndarray:
    """float64 logsumexp with jsoftmax's conventions (empty / fully masked slice: -inf)."""
    x64, axis = _masked_f64(x, axis, where)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        row_max = np.max(x64, axis=axis, keepdims=True, initial=-np.inf)
        shift = np.where(np.isfinite(row_max), row_max, 0.0)
        total = np.sum(np.exp(x64 - shift), axis=axis, keepdims=True)
        out = np.where(row_max == np.inf, np.inf, shift + np.log(total))
    return out if keepdims else np.squeeze(out, axis=axis)


def ref_log_softmax(x: Any, axis: Any = -1, where: Any = None) -> np.ndarray:
    """float64 log_softmax for finite or -inf inputs: fully masked slices give -inf."""
    x64, axis = _masked_f64(x, axis, where)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        row_max = np.max(x64, axis=axis, keepdims=True, initial=-np.inf)
        shift = np.where(np.isfinite(row_max), row_max, 0.0)
        shifted = x64 - shift
        total = np.sum(np.exp(shifted), axis=axis, keepdims=True)
        return shifted - np.log(np.where(total == 0, 1.0, total))


def ref_softmax(x: Any, axis: Any = -1, where: Any = None) -> np.ndarray:
    """float64 softmax for finite or -inf inputs: fully masked slices give 0."""
    return np.exp(ref_log_softmax(x, axis, where))


def relative_error(approx: Any, exact: np.ndarray) -> float:
    """max |approx - exact| / max |exact| over the finite part, in float64."""
    approx64 = to_f64(approx)
    scale = np.max(np.abs(exact))
    return float(np.max(np.abs(approx64 - exact)) / (scale if scale > 0 else 1.0))


def enable_x64() -> Any:
    """Context manager turning on JAX's 64-bit types."""
    import jax

    return jax.enable_x64(True)


def ref_cross_entropy(
    logits: Any,
    labels: Any,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> np.ndarray:
    """float64 cross-entropy with torch's semantics and jsoftmax's conventions.

    The definition written out: ``-sum_c t_c log_softmax(x)_c`` with torch's smoothed, weighted
    target ``t``; terms with ``t_c == 0`` are 0 (0 * log 0 = 0); integer labels equal to
    ``ignore_index`` give 0; a ``mean`` whose denominator is 0 gives 0 (torch: NaN). Labels must
    be in range.
    """
    x64 = np.moveaxis(to_f64(logits), axis, -1)
    num_classes = x64.shape[-1]
    log_probs = ref_log_softmax(x64, -1)
    class_weight = np.ones(num_classes) if weight is None else to_f64(weight)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):  # probabilities (bf16 included)
        probs = np.moveaxis(to_f64(labels), axis, -1)
        target = class_weight * ((1 - label_smoothing) * probs + label_smoothing / num_classes)
        denominator = float(np.prod(x64.shape[:-1]))
    else:
        valid = labels != ignore_index
        safe_labels = np.where(valid, labels, 0)
        one_hot = np.arange(num_classes) == safe_labels[..., None]
        label_weight = class_weight[safe_labels]
        target = (1 - label_smoothing) * one_hot * label_weight[..., None]
        target = target + label_smoothing / num_classes * class_weight
        target = np.where(valid[..., None], target, 0.0)
        denominator = float(np.sum(np.where(valid, label_weight, 0.0)))
    with np.errstate(invalid="ignore"):
        loss = -np.sum(np.where(target == 0, 0.0, target * log_probs), axis=-1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.asarray(loss.sum())
    return np.asarray(0.0 if denominator == 0 else loss.sum() / denominator)


# --------------------------------------------------------------------------------------------
# torch interop (torch is imported lazily: the core's tests must not need it)


def torch_dtype_sample(name: str) -> Any:
    """Eight deterministic values of torch dtype ``name``, with 64-bit-only values where 64-bit."""
    import torch

    dtype = getattr(torch, name)
    if name == "bool":
        return torch.tensor([True, False, True, True, False, False, True, False])
    if name.startswith(("int", "uint")):
        values = [0, 1, 2, 3, 5, 8, 13, 21]
        if name == "int64":
            values[-1] = -(2**40)
        elif name == "uint64":
            values[-1] = 2**63 + 1
        elif name.startswith("int"):
            values[0] = -7
        return torch.tensor(values, dtype=torch.int64 if name != "uint64" else dtype).to(dtype)
    real = torch.linspace(-3.0, 3.0, 8, dtype=torch.float64) + 1.0 / 3.0
    if name.startswith("complex"):
        return torch.complex(real, -2 * real).to(dtype)
    if name == "float8_e8m0fnu":  # powers of two only
        return torch.exp2(torch.arange(-4.0, 4.0)).to(dtype)
    return real.to(dtype)


def raw_bytes(array: Any) -> bytes:
    """The bytes of a torch tensor or a JAX/numpy array, for bit-exact comparisons."""
    import torch

    if isinstance(array, torch.Tensor):
        flat = array.detach().cpu().contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(np.asarray(array)).tobytes()
