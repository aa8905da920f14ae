"""The machine and software a run measured: at the top of the report, and in the JSON."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector extensions the CPU reports (avx2, avx512f, ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_REUSE = "glibc mallopt: M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB"
MALLOC_DEFAULT = "process default"


def keep_freed_memory() -> str:
    """Asks glibc's malloc to serve large blocks from memory it keeps, not fresh mmap pages.

    By default every block above 32 MiB is a fresh mapping whose pages fault in on first write:
    on this VM that alone costs a 4096x4096 float32 torch.softmax about 25 of its 31 ms. This
    changes torch's CPU allocations; JAX's CPU buffers do not come from glibc's heap and are
    unaffected. Returns what is now in effect (the default where glibc is absent).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, 2**30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return MALLOC_DEFAULT
    return MALLOC_REUSE if done else MALLOC_DEFAULT


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache, from sysfs; None where unknown."""
    largest = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        largest = size if largest is None else max(largest, size)
    return largest


def memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> str | None:
    """The repository's commit (with ``-dirty`` for uncommitted changes), for A/B bookkeeping."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "jsoftmax")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def jsoftmax_kernel_state() -> dict[str, Any]:
    """Whether jsoftmax computes with its CPU kernels in this process (``cpu_kernel_info``)."""
    import jsoftmax

    info = getattr(jsoftmax, "cpu_kernel_info", None)
    if info is None:
        return {"available": False, "error": "this jsoftmax has no CPU kernels"}
    state: dict[str, Any] = info()
    state["in_use"] = bool(
        state["available"]
        and state["mode"] != "off"
        and (state["mode"] == "on" or state["single_cpu_device"])
    )
    return state


def describe_kernel(state: dict[str, Any] | None) -> str:
    if not state:
        return "not recorded"
    if state.get("in_use"):
        return f"in use on CPU (JSOFTMAX_CPU_KERNEL={state['mode']})"
    if not state.get("available"):
        return f"not in use: {state.get('error')}"
    return f"not in use (JSOFTMAX_CPU_KERNEL={state['mode']}, several CPU devices)"


def describe(device: str, torch_threads: int, malloc: str = MALLOC_DEFAULT) -> dict[str, Any]:
    """Everything about the machine and software worth recording next to a figure."""
    import jax
    import jaxlib
    import numpy as np

    import jsoftmax

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_vector_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "memory_total_bytes": memory_total_bytes(),
        "load_average_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "jsoftmax": jsoftmax.__version__,
        "git_revision": git_revision(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        # XLA's CPU backend sizes its thread pool to the usable cores; no flag changes it here.
        "xla_cpu_threads": usable_cores(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        "torch_threads": torch_threads,
        "malloc": malloc,
        # Builds the kernels now if needed, so no timed case pays for the build.
        "jsoftmax_cpu_kernel": jsoftmax_kernel_state(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        if device == "gpu" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            info["gpu_name"] = props.name
            info["gpu_memory_bytes"] = props.total_memory
            info["gpu_l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
            info["cuda"] = torch.version.cuda
            info["jax_device_kind"] = jax.devices("gpu")[0].device_kind
    except ImportError:
        info["torch"] = None
    return info


def format_environment(info: dict[str, Any]) -> str:
    """The environment as a short markdown list, for the top of the report."""

    def mib(value: Any) -> str:
        return "?" if value is None else f"{value / 2**20:.0f} MiB"

    def gib(value: Any) -> str:
        return "?" if value is None else f"{value / 2**30:.0f} GiB"

    lines = [
        f"- date: {info['date_utc']}; device: {info['device']}",
        f"- CPU: {info['cpu_model']}, {info['usable_cores']} usable cores "
        f"(of {info['cpu_count']}), last-level cache {mib(info['last_level_cache_bytes'])}, "
        f"memory {gib(info['memory_total_bytes'])}, "
        f"vector extensions: {', '.join(info['cpu_vector_flags']) or '?'}",
    ]
    if info.get("gpu_name"):
        lines.append(
            f"- GPU: {info['gpu_name']}, {gib(info.get('gpu_memory_bytes'))}, "
            f"L2 {mib(info.get('gpu_l2_cache_bytes'))}, CUDA {info.get('cuda')}, "
            f"jax device kind {info.get('jax_device_kind')}"
        )
    lines += [
        f"- software: Python {info['python']}, jax {info['jax']} (jaxlib {info['jaxlib']}, "
        f"backend {info['jax_backend']}), torch {info.get('torch')}, numpy {info['numpy']}, "
        f"jsoftmax {info['jsoftmax']} at {info.get('git_revision') or '?'}",
        f"- threads: XLA CPU {info['xla_cpu_threads']} (all usable cores), torch intra-op "
        f"{info['torch_threads']} (set to match), torch inter-op "
        f"{info.get('torch_interop_threads')}; XLA_FLAGS={info['XLA_FLAGS'] or '(unset)'}; "
        f"malloc: {info.get('malloc', MALLOC_DEFAULT)}",
        f"- load average at start: {info.get('load_average_start')}, at end: "
        f"{info.get('load_average_end', '?')}",
        f"- platform: {info['platform']}",
        "- jsoftmax CPU kernels (jsoftmax/_cpu/kernels.cc; the XLA path otherwise): "
        + describe_kernel(info.get("jsoftmax_cpu_kernel")),
    ]
    return "\n".join(lines)
