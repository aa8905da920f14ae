"""The CPU kernels of ``_cpu/kernels.cc``: built with the package, registered at import.

XLA's CPU code makes three or four passes over the whole array for a softmax (benchmarks/NOTES.md
has the compiled HLO); the kernels make one read and one write per row, with the row kept in cache.
They are called through ``jax.ffi`` and only where the result is the same as the XLA path's (the
tests check both against each other): on CPU, float32 / bfloat16 / float16, reduction over one
contiguous block of axes (trailing, or followed by 16 to 128 entries; a ``where`` mask is applied
by XLA first), no ``axis_name``, and on an explicitly sharded array only with the reduced axes
and those after them unsharded. ``_primitives.py`` decides, when lowering for CPU. cross_entropy
with integer labels has two row kernels of its own (``CROSS_ENTROPY_TARGETS``, called by
:func:`call_rows`), under the same conditions with the classes along the last axis.

Building the package (``pip install``, ``pip wheel``; CMakeLists.txt) compiles one library per
instruction set into ``_cpu/`` with a ``manifest.json`` of their sizes and SHA-256 digests. At
import this module checks a library against the manifest before it maps it (a truncated file
would crash the process), asks the generic one which variant the CPU supports, loads that one and
registers its handlers. Nothing is compiled at run time. ``JSOFTMAX_CPU_ISA`` (``generic``,
``avx2``, ``avx512``, ``avx512bf16``; read once, at import) forces a lower variant. Without the
libraries (installed where no C++ compiler was found) or when a check fails, the XLA path is used
everywhere, a warning says so once, and :func:`cpu_kernel_info` says why.

``JSOFTMAX_CPU_KERNEL`` (read when a function is traced): ``auto`` (default) uses the kernels
when the process has a single CPU device; ``on`` also with several (the kernels require the
reduced axes unsharded: XLA gathers them otherwise); ``off`` never.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

_OPS = (
    "softmax_fwd", "log_softmax_fwd", "softmax_bwd", "log_softmax_bwd",
    # the backward pass from the input x instead of the output (what reverse mode saves)
    "softmax_bwd_from_input", "log_softmax_bwd_from_input",
)  # fmt: skip
# cross_entropy over rows (integer labels): the per-row statistics, and the gradient times the
# cotangent (_primitives.py, label_stats_p and label_tangent_p).
CROSS_ENTROPY_TARGETS = ("cross_entropy_stats", "cross_entropy_bwd")
TARGETS = _OPS + tuple(f"{op}_columns" for op in _OPS) + CROSS_ENTROPY_TARGETS
# Column kernels take 16 neighbouring slices per vector: fewer than 16 entries after the reduced
# axes leave lanes idle, and beyond 128 the strided walk is slower than the XLA path
# (benchmarks/NOTES.md).
_MIN_INNER, _MAX_INNER = 16, 128
MODES = ("auto", "on", "off")
# Library variants from the most portable to the fastest; each runs on a subset of the CPUs the
# one before it runs on.
ISAS = ("generic", "avx2", "avx512", "avx512bf16")
ISA_ENV = "JSOFTMAX_CPU_ISA"
_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})
_MANIFEST = "manifest.json"
_state: dict[str, Any] = {
    "error": None,  # why the kernels are unavailable
    "isa_error": None,  # a bad JSOFTMAX_CPU_ISA: raised by eligible() and cpu_kernel_info()
    "library": None,  # the loaded variant's path
    "isa": None,  # the loaded variant
    "cpu_isa": None,  # the best variant this CPU supports
    "warned": False,
}


def _package_dirs() -> list[Path]:
    """The directories of the ``jsoftmax`` package: one when installed from a wheel; the build
    output and the source tree for an editable install."""
    package = sys.modules[__name__.rpartition(".")[0]]
    return [Path(entry) for entry in getattr(package, "__path__", [])]


def _find_manifest() -> Path:
    for directory in _package_dirs():
        candidate = directory / "_cpu" / _MANIFEST
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        "this installation has no compiled kernels (jsoftmax/_cpu/manifest.json is missing): it "
        "was installed where no C++ compiler was found, or from a source tree that was never "
        "built; `pip install` with a C++17 compiler on PATH builds them"
    )


def _check_source(manifest: dict[str, Any]) -> None:
    """In a source tree (an editable install), the libraries must come from the current source."""
    for directory in _package_dirs():
        source = directory / "_cpu" / "kernels.cc"
        if source.is_file():
            if hashlib.sha256(source.read_bytes()).hexdigest() != manifest["source_sha256"]:
                raise RuntimeError(
                    f"{source} changed since the kernels were built: rebuild them with "
                    "`pip install -e .`"
                )
            return


def _open_verified(directory: Path, manifest: dict[str, Any], isa: str) -> ctypes.CDLL:
    """Loads variant ``isa`` after checking its size and digest against the manifest.

    Mapping a truncated library can kill the process (SIGBUS), so nothing is loaded unchecked.
    """
    entry = manifest["libraries"].get(isa)
    if entry is None:
        raise RuntimeError(f"the {isa} kernels were not built (compiler without support for it)")
    path = directory / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RuntimeError(f"cannot read {path}: {error}") from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RuntimeError(
            f"{path} does not match its build manifest ({len(data)} bytes, expected "
            f"{entry['size']}): the installation is damaged; reinstall jsoftmax"
        )
    library = ctypes.CDLL(str(path))
    library.jsoftmax_isa.restype = ctypes.c_char_p
    built_for = library.jsoftmax_isa().decode()
    if built_for != isa:
        raise RuntimeError(f"{path} holds the {built_for} kernels, not {isa}")
    return library


def _chosen_isa(best: str) -> str:
    requested = os.environ.get(ISA_ENV, "").strip().lower()
    if not requested:
        return best
    if requested not in ISAS:
        raise ValueError(f"{ISA_ENV}: expected one of {ISAS}, got {requested!r}")
    if ISAS.index(requested) > ISAS.index(best):
        raise ValueError(
            f"{ISA_ENV}: this CPU supports the kernels up to {best!r}, got {requested!r} "
            "(the variable may only force a lower instruction set)"
        )
    return requested


def _load() -> None:
    """Finds, checks, loads and registers the kernels; records why in ``_state`` if it cannot."""
    try:
        manifest_path = _find_manifest()
        manifest = json.loads(manifest_path.read_text())
        _check_source(manifest)
        directory = manifest_path.parent
        generic = _open_verified(directory, manifest, "generic")
        generic.jsoftmax_cpu_isa.restype = ctypes.c_char_p
        best = generic.jsoftmax_cpu_isa().decode()
        while best not in manifest["libraries"]:  # a variant this compiler could not build
            best = ISAS[ISAS.index(best) - 1]
        _state["cpu_isa"] = best
        try:
            isa = _chosen_isa(best)
        except ValueError as error:
            _state["isa_error"] = str(error)
            raise RuntimeError(str(error)) from None
        library = generic if isa == "generic" else _open_verified(directory, manifest, isa)
        for name in TARGETS:
            symbol = getattr(library, f"jsoftmax_{name}")
            jax.ffi.register_ffi_target(
                f"jsoftmax_{name}", jax.ffi.pycapsule(symbol), platform="cpu"
            )
            # Rows may be sharded; the reduced axis may not (eligible() checks).
            jax.ffi.register_ffi_target_as_batch_partitionable(f"jsoftmax_{name}")
        _state["library"] = str(directory / manifest["libraries"][isa]["file"])
        _state["isa"] = isa
    except Exception as error:  # any failure leaves the XLA path, which is always correct
        _state["error"] = f"{type(error).__name__}: {error}"


def load() -> bool:
    """Whether the kernels are registered (they are loaded once, when this module is imported)."""
    if _state["isa_error"] is not None:
        raise ValueError(_state["isa_error"])
    return _state["error"] is None


def _warn_unavailable() -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"jsoftmax: CPU kernels unavailable, using the XLA path (same results, slower): "
            f"{_state['error']}",
            RuntimeWarning,
            stacklevel=3,
        )


def mode() -> str:
    value = os.environ.get("JSOFTMAX_CPU_KERNEL", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"JSOFTMAX_CPU_KERNEL: expected one of {MODES}, got {value!r}")
    return value


@cache
def _single_cpu_device() -> bool:
    try:
        return len(jax.devices("cpu")) == 1 and jax.process_count() == 1
    except RuntimeError:  # no CPU backend
        return False


def _layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(outer, n, inner) when ``axes`` are one contiguous block of ``shape``, else None."""
    if not axes or axes != tuple(range(axes[0], axes[0] + len(axes))):
        return None
    outer = math.prod(shape[: axes[0]])
    n = math.prod(shape[axes[0] : axes[-1] + 1])
    inner = math.prod(shape[axes[-1] + 1 :])
    return outer, n, inner


def _split(x: jax.Array, dims: range) -> bool:
    """Whether ``x`` is explicitly sharded along any of ``dims`` (its type says so under an
    Explicit mesh; under Auto or without a mesh every entry is None)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None:
        return False
    entries = tuple(spec) + (None,) * (x.ndim - len(spec))
    return any(entries[dim] is not None for dim in dims)


def eligible(x: jax.Array, axes: tuple[int, ...], axis_name: Any) -> bool:
    """Whether the kernels compute this call (a trace-time decision; the XLA path otherwise)."""
    chosen = mode()
    if chosen == "off" or axis_name is not None or jnp.dtype(x.dtype) not in _DTYPES:
        return False
    layout = _layout(x.shape, axes)
    if x.size == 0 or layout is None:
        return False
    if layout[2] != 1 and not _MIN_INNER <= layout[2] <= _MAX_INNER:
        return False
    if chosen == "auto" and not _single_cpu_device():
        return False
    # A kernel needs whole slices, and `call` merges the axes after the reduced block when there
    # are several: a split there has no kernel equivalent (the XLA path partitions it).
    after = range(axes[-1] + 1, x.ndim)
    if _split(x, range(axes[0], axes[-1] + 1)) or (len(after) > 1 and _split(x, after)):
        return False
    if not load():
        _warn_unavailable()
        return False
    return True


def cpu_kernel_info() -> dict[str, Any]:
    """Whether jsoftmax's CPU kernels are in use in this process, and why not if they are not.

    Returns a dict: ``mode`` (``JSOFTMAX_CPU_KERNEL``), ``available`` (loaded and registered),
    ``isa`` (the variant in use: ``generic``, ``avx2``, ``avx512`` or ``avx512bf16``),
    ``cpu_isa`` (the best variant this CPU supports), ``library`` (the loaded library's path),
    ``error`` (why they are unavailable) and ``single_cpu_device`` (what ``auto`` mode requires).
    """
    available = load()
    return {
        "mode": mode(),
        "available": available,
        "isa": _state["isa"],
        "cpu_isa": _state["cpu_isa"],
        "library": _state["library"],
        "error": _state["error"],
        "single_cpu_device": _single_cpu_device(),
    }


def call(name: str, axes: tuple[int, ...], *operands: jax.Array) -> jax.Array:
    """Kernel ``name`` over the slices of ``axes`` (a contiguous block, checked by ``eligible``).

    Trailing axes go to the row kernels as [..., n]; a block followed by more axes goes to the
    column kernels as [..., n, inner]. The axes before the block are kept as they are (they may be
    sharded); both are reshapes, never copies.
    """
    first = operands[0]
    layout = _layout(first.shape, axes)
    assert layout is not None
    _, n, inner = layout
    leading = first.shape[: axes[0]]
    if inner == 1:
        shape: tuple[int, ...] = (*leading, n)
    else:
        shape, name = (*leading, n, inner), f"{name}_columns"
    flat = [operand.reshape(shape) for operand in operands]
    result = jax.ffi.ffi_call(f"jsoftmax_{name}", jax.typeof(flat[0]), vmap_method="broadcast_all")(
        *flat
    )
    return result.reshape(first.shape)


def call_rows(
    name: str, result: jax.ShapeDtypeStruct, *operands: jax.Array, **attributes: Any
) -> jax.Array:
    """Kernel ``name`` over the rows of the first operand (its last axis); the other operands
    hold one value (or a few trailing ones) per row; ``attributes`` are the kernel's scalar
    attributes. The leading axes stay as they are."""
    call = jax.ffi.ffi_call(f"jsoftmax_{name}", result, vmap_method="broadcast_all")
    return call(*operands, **attributes)


_load()
