"""One benchmark run: the environment, the timed cases and the extra sections, as one dict."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _cross_entropy, _report
from ._accuracy import run_accuracy
from ._config import COPY_ROWS, MODEL_BYTES_FACTOR, Case, RunConfig, case_contenders, plan_cases
from ._contenders import CaseData, Target, make_runner, make_target
from ._environment import (
    MALLOC_DEFAULT,
    describe,
    keep_freed_memory,
    last_level_cache_bytes,
    load_average,
    usable_cores,
)
from ._interop import run_interop
from ._overhead import run_overhead
from ._timing import Timing, measure


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timing_row(case: Case, name: str, timing: Timing) -> dict[str, Any]:
    factor = 2 if name in COPY_ROWS else MODEL_BYTES_FACTOR[case.pass_]
    model_bytes = factor * case.size * jnp.dtype(case.dtype).itemsize
    return {
        "op": case.op,
        "shape": list(case.shape),
        "axis": case.axis,
        "row_length": case.row_length,
        "dtype": case.dtype,
        "pass": case.pass_,
        "suites": list(case.suites),
        "contender": name,
        "median_s": timing.median_s,
        "p20_s": timing.p20_s,
        "p80_s": timing.p80_s,
        "rounds": len(timing.per_call_s),
        "inner": timing.inner,
        "first_call_s": timing.first_call_s,
        "compile_s": timing.compile_s,
        "model_bytes": model_bytes,
        "gbps": model_bytes / timing.median_s / 1e9,
        "gbps_p20": model_bytes / timing.p80_s / 1e9,
        "gbps_p80": model_bytes / timing.p20_s / 1e9,
        "peak_extra_bytes": None,
        "samples_s": list(timing.per_call_s),
    }


def run_timing(
    config: RunConfig, target: Target, progress: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Times every planned case; returns the rows and notes on what could not run."""
    cases = plan_cases(config)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    copied: set[tuple[tuple[int, ...], str]] = set()
    start = time.perf_counter()
    for index, case in enumerate(cases, 1):
        names = list(case_contenders(config, case))
        # The copy reference runs once per (shape, dtype), interleaved with that shape's first case.
        with_copy = (case.shape, case.dtype) not in copied
        if with_copy:
            names += list(COPY_ROWS)
            copied.add((case.shape, case.dtype))
        data = CaseData.create(case, target.rotate_bytes, config.seed)
        runners = []
        for name in names:
            try:
                runners.append(make_runner(name, case, data, target))
            except Exception as err:  # a contender that cannot set up is a note, not a crash
                message = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                notes.append(f"{case.label()}: {name} could not be prepared ({message})")
                progress(f"    {name} could not be prepared: {message}")
        timings, failures = measure(
            runners,
            budget_s=config.case_budget_s(),
            min_rounds=config.min_rounds(),
            max_rounds=config.max_rounds(),
            sync_each=not target.gpu,
            progress=progress,
        )
        for name, error in failures.items():
            notes.append(f"{case.label()}: {name} failed ({error})")
        for runner in runners:
            if runner.name not in timings:
                continue
            row = _timing_row(case, runner.name, timings[runner.name])
            if runner.peak_probe is not None:
                try:
                    row["peak_extra_bytes"] = runner.peak_probe()
                except Exception:  # memory figures are best-effort
                    row["peak_extra_bytes"] = None
            rows.append(row)
        del runners, data
        gc.collect()
        summary = ", ".join(
            f"{name} {timing.median_s * 1e3:.3g}" for name, timing in timings.items()
        )
        elapsed = time.perf_counter() - start
        progress(f"[{index}/{len(cases)} {elapsed:.0f}s] {case.label()}: {summary} ms")
    _report.annotate_rows(rows)
    return rows, notes


def run(config: RunConfig, progress: Callable[[str], None] = stderr_progress) -> dict[str, Any]:
    """Runs the configured sections and returns every figure with the environment.

    Args:
      config: what to measure (see :class:`RunConfig`).
      progress: called with one line per finished step (stderr by default).

    Returns:
      The report as a JSON-ready dict: ``environment``, ``config``, ``timings``, ``headline``,
      ``accuracy``, ``interop``, ``overhead``, ``cross_entropy``, ``notes``, ``elapsed_s``.
    """
    import torch

    begin = time.perf_counter()
    torch_threads = usable_cores()
    torch.set_num_threads(torch_threads)
    malloc = keep_freed_memory() if config.malloc_reuse else MALLOC_DEFAULT
    target = make_target(config.device, last_level_cache_bytes())
    if config.smoke:
        target.rotate_bytes = 0  # one input per contender: the smoke test checks plumbing only
    environment = describe(config.device, torch.get_num_threads(), malloc)
    report: dict[str, Any] = {
        "schema": 1,
        "environment": environment,
        "config": _report.config_summary(config, target),
        "timings": [],
        "notes": [],
    }
    with jax.default_device(target.jax_device):
        if "timing" in config.sections:
            report["timings"], notes = run_timing(config, target, progress)
            report["notes"] += notes
        report["headline"] = _report.headline_ratios(report["timings"])
        report["ratio_summary"] = _report.ratio_summary(report["timings"])
        if "accuracy" in config.sections:
            contenders = tuple(
                name
                for name in config.resolved_contenders()
                if name != "torch.compile" or not (config.quick and config.device == "cpu")
            )
            shape = config.accuracy_shape()
            report["accuracy"] = run_accuracy(
                contenders, _accuracy_dtypes(config), shape, target, config.seed, progress
            )
            report["accuracy_shape"] = list(shape)
        if "interop" in config.sections:
            report["interop"] = run_interop(config, target, progress)
        if "overhead" in config.sections:
            report["overhead"] = run_overhead(config, target, progress)
        if "cross_entropy" in config.sections:
            report["cross_entropy"] = _cross_entropy.run_cross_entropy(config, target, progress)
    environment["load_average_end"] = load_average()
    report["elapsed_s"] = time.perf_counter() - begin
    return report


def _accuracy_dtypes(config: RunConfig) -> tuple[str, ...]:
    """The dtypes asked for; by default all three, f16 included: accuracy is cheap to check."""
    return config.dtypes if config.dtypes is not None else ("float32", "bfloat16", "float16")
