"""The CPU kernels of ``_cpu/kernels.cc``: built for this machine on first use, then cached.

XLA's CPU code makes three or four passes over the whole array for a softmax (benchmarks/NOTES.md
has the compiled HLO); the kernels make one read and one write per row, with the row kept in cache.
They are called through ``jax.ffi`` and only where the result is the same as the XLA path's (the
tests check both against each other): on CPU, float32 / bfloat16 / float16, reduction over one
contiguous block of axes (trailing, or followed by 16 to 128 entries), no ``where`` mask on the
forward pass, no ``axis_name``.

Building needs a C++17 compiler (``$CXX``, else ``c++``) and the XLA FFI headers that jaxlib
ships. The library goes to ``$JSOFTMAX_CACHE_DIR`` (default ``~/.cache/jsoftmax``), named by a
hash of the source, jaxlib's version, the compiler, its flags and the CPU, so one build serves
every later process on the machine. Without a compiler, or when anything fails, the XLA path is
used everywhere and :func:`cpu_kernel_info` says why.

``JSOFTMAX_CPU_KERNEL`` (read when a function is traced): ``auto`` (default) uses the kernels
when the process has a single CPU device; ``on`` also with several (the kernels require the
reduced axes unsharded: XLA gathers them otherwise); ``off`` never.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger("jsoftmax")

SOURCE = Path(__file__).with_name("_cpu") / "kernels.cc"
_OPS = ("softmax_fwd", "log_softmax_fwd", "softmax_bwd", "log_softmax_bwd")
TARGETS = _OPS + tuple(f"{op}_columns" for op in _OPS)
# Column kernels process up to 128 neighbouring slices at once (16 per vector of lanes), walking
# down the reduced axes at a stride of `inner` entries. Fewer than 16 entries after the reduced
# axes would leave lanes idle; beyond 128 a unit covers only part of each row and the strided walk
# thrashes the caches (a first version took 5.8 ms for [4, 1024, 1024] over axis 1 against 2.1 ms
# on the XLA path; from 16 to 128 the kernels measured 1.0-2.4x faster than the XLA path and
# about as fast as jax.nn: benchmarks/NOTES.md). Outside that range: the XLA path.
_MIN_INNER, _MAX_INNER = 16, 128
MODES = ("auto", "on", "off")
_DTYPES = frozenset({jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "error": None, "library": None}


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux shows them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _cache_dir() -> Path:
    configured = os.environ.get("JSOFTMAX_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jsoftmax"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _compiler_version(compiler: list[str]) -> str:
    done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{compiler[0]} --version failed: {done.stderr.strip()[:200]}")
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


def _build(target: Path, compiler: list[str], flags: tuple[str, ...]) -> None:
    include = jax.ffi.include_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        command = [*compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent process sees none or all of it
    finally:
        partial.unlink(missing_ok=True)


def _library_path(flags: tuple[str, ...], compiler: list[str]) -> Path:
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        jax.lib.__version__.encode() if hasattr(jax, "lib") else b"",
        jax.ffi.include_dir().encode(),
        _compiler_version(compiler).encode(),
        " ".join(flags).encode(),
        _cpu_identity().encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"kernels-{digest.hexdigest()[:24]}.so"


def _load_library() -> ctypes.CDLL:
    if platform.system() == "Windows":
        raise RuntimeError("the CPU kernels are built on Linux and macOS only")
    compiler = _compiler()
    errors = []
    # -march=native first (AVX-512 where the CPU has it); then portable code.
    for flags in ((*_FLAGS, "-march=native"), _FLAGS):
        path = _library_path(flags, compiler)
        try:
            if not path.exists():
                log.info("jsoftmax: building the CPU kernels into %s", path)
                _build(path, compiler, flags)
            return ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    raise RuntimeError("\n".join(errors))


def load() -> bool:
    """Builds (once per machine) and registers the kernels; False when they are unavailable."""
    with _lock:
        if _state["loaded"]:
            return _state["error"] is None
        _state["loaded"] = True
        try:
            if not SOURCE.exists():
                raise RuntimeError(f"{SOURCE} is missing from the installation")
            library = _load_library()
            for name in TARGETS:
                symbol = getattr(library, f"jsoftmax_{name}")
                jax.ffi.register_ffi_target(
                    f"jsoftmax_{name}", jax.ffi.pycapsule(symbol), platform="cpu"
                )
                batchable = getattr(jax.ffi, "register_ffi_target_as_batch_partitionable", None)
                if batchable is not None:  # rows may be sharded; the reduced axis may not
                    batchable(f"jsoftmax_{name}")
            _state["library"] = library._name
        except Exception as error:  # any failure leaves the XLA path, which is always correct
            _state["error"] = f"{type(error).__name__}: {error}"
            log.info("jsoftmax: CPU kernels unavailable, using the XLA path: %s", _state["error"])
        return _state["error"] is None


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
    return load()


def cpu_kernel_info() -> dict[str, Any]:
    """Whether jsoftmax's CPU kernels are in use in this process, and why not if they are not.

    Returns a dict: ``mode`` (``JSOFTMAX_CPU_KERNEL``), ``available`` (built and registered),
    ``library`` (the shared library's path), ``error`` (why they are unavailable) and
    ``single_cpu_device`` (what ``auto`` mode requires). Calling it builds the kernels if they
    are not built yet.
    """
    available = load()
    return {
        "mode": mode(),
        "available": available,
        "library": _state["library"],
        "error": _state["error"],
        "single_cpu_device": _single_cpu_device(),
    }


def call(name: str, axes: tuple[int, ...], *operands: jax.Array) -> jax.Array:
    """Kernel ``name`` over the slices of ``axes`` (a contiguous block, checked by ``eligible``).

    Trailing axes go to the row kernels as [rows, n]; a block followed by more axes goes to the
    column kernels as [outer, n, inner]. Both are reshapes, never copies.
    """
    first = operands[0]
    layout = _layout(first.shape, axes)
    assert layout is not None
    outer, n, inner = layout
    if inner == 1:
        shape: tuple[int, ...] = (outer, n)
    else:
        shape, name = (outer, n, inner), f"{name}_columns"
    flat = [operand.reshape(shape) for operand in operands]
    out = jax.ShapeDtypeStruct(shape, first.dtype)
    result = jax.ffi.ffi_call(f"jsoftmax_{name}", out, vmap_method="broadcast_all")(*flat)
    return result.reshape(first.shape)
