"""Interleaved timing: every contender of a case is sampled in turn, round after round.

On a shared 2-core machine the load changes by the second; sampling contenders round-robin (the
starting contender rotates each round) exposes them all to the same conditions, and the median
with its 20th and 80th percentiles says how much the conditions moved. Compilation and warm-up are
excluded from the samples; the first call's time is kept apart.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class Runner:
    """A prepared contender: ``step()`` runs one call on the next input of its rotation.

    Attributes:
      name: the contender's name.
      step: one call; returns its outputs so that ``sync`` can wait for them.
      sync: waits until the outputs of ``step`` are computed.
      cuda_events: time with CUDA events (torch on GPU) instead of the host clock.
      peak_probe: returns the extra device memory one call needs (outputs and temporaries),
        where it can be known; called once, after the timing.
      warmup_calls: calls before timing (at least 2): the size of its input pool, so every
        entry has been through once and no first-touch cost lands in a sample.
    """

    name: str
    step: Callable[[], Any]
    sync: Callable[[Any], None]
    cuda_events: bool = False
    peak_probe: Callable[[], int | None] | None = None
    warmup_calls: int = 2


@dataclasses.dataclass
class Timing:
    """The samples of one runner in one case, in seconds per call."""

    per_call_s: list[float]
    inner: int
    first_call_s: float

    @property
    def median_s(self) -> float:
        return float(np.median(self.per_call_s))

    @property
    def p20_s(self) -> float:
        return float(np.percentile(self.per_call_s, 20))

    @property
    def p80_s(self) -> float:
        return float(np.percentile(self.per_call_s, 80))

    @property
    def compile_s(self) -> float:
        """First call minus a steady call: tracing, compiling and first-touch costs."""
        return max(0.0, self.first_call_s - self.median_s)


def _sample(runner: Runner, inner: int, sync_each: bool) -> float:
    """Seconds per call over ``inner`` back-to-back calls."""
    if runner.cuda_events:
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            runner.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    out = None
    for _ in range(inner):
        out = runner.step()
        if sync_each:
            runner.sync(out)
    runner.sync(out)
    return (time.perf_counter() - begin) / inner


def _warm_up(runner: Runner, sync_each: bool) -> float:
    """Warms ``runner`` up (caches, allocator, lazy initialisation); returns a call's time.

    The fastest warm call sizes the samples: one call stalled by the scheduler must not shrink
    every later sample to a single call. Fast calls get up to 10 tries within 20 ms.
    """
    times: list[float] = []
    spent = 0.0
    while len(times) < max(1, runner.warmup_calls - 1) or (len(times) < 10 and spent < 0.02):
        times.append(_sample(runner, 1, sync_each))
        spent += times[-1]
    return min(times)


def measure(
    runners: Sequence[Runner],
    *,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    target_sample_s: float = 0.004,
    sync_each: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Times each runner round-robin; returns its timings and the runners that failed.

    Args:
      runners: the prepared contenders of one case.
      budget_s: seconds of sampling to aim for, all runners together; the number of rounds is
        this divided by one round's duration, clamped to ``[min_rounds, max_rounds]``.
      min_rounds: fewest samples per runner.
      max_rounds: most samples per runner.
      target_sample_s: a sample repeats a fast call until it lasts about this long, so that
        the clock's resolution and Python's loop cost stay small against it.
      sync_each: wait for each call before the next (host-synchronous latency, as torch on CPU
        is); False on GPU, where a sample waits once for all its calls (throughput).
      progress: called with a message when a runner fails.

    Returns:
      ``(timings, failures)``: timings by runner name, and the error of each runner that raised
      while running (it is then left out of the rounds).
    """
    timings: dict[str, Timing] = {}
    failures: dict[str, str] = {}
    inner: dict[str, int] = {}
    estimate: dict[str, float] = {}
    live: list[Runner] = []
    gc.collect()
    for runner in runners:
        try:
            begin = time.perf_counter()
            runner.sync(runner.step())
            first_call_s = time.perf_counter() - begin
            one_call_s = _warm_up(runner, sync_each)
        except Exception as err:  # a contender that cannot run this case is reported, not fatal
            failures[runner.name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            if progress is not None:
                progress(f"    {runner.name} failed: {failures[runner.name]}")
            continue
        inner[runner.name] = max(1, min(1000, round(target_sample_s / max(one_call_s, 1e-9))))
        estimate[runner.name] = inner[runner.name] * one_call_s
        timings[runner.name] = Timing([], inner[runner.name], first_call_s)
        live.append(runner)
    if not live:
        return timings, failures
    round_s = sum(estimate.values())
    rounds = max(min_rounds, min(max_rounds, math.ceil(budget_s / max(round_s, 1e-9))))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whichever runner it hit
    try:
        for index in range(rounds):
            shift = index % len(live)
            for runner in live[shift:] + live[:shift]:
                timings[runner.name].per_call_s.append(
                    _sample(runner, inner[runner.name], sync_each)
                )
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings, failures


class Rotation:
    """Cycles through a pool of inputs, so consecutive calls do not find theirs in cache.

    >>> pool = Rotation(["a", "b", "c"])
    >>> [pool.next() for _ in range(4)]
    ['a', 'b', 'c', 'a']
    """

    def __init__(self, items: Sequence[Any]) -> None:
        if not items:
            raise ValueError("Rotation: items expected at least one item, got none")
        self.items = list(items)
        self.index = -1

    def next(self) -> Any:
        self.index = (self.index + 1) % len(self.items)
        return self.items[self.index]

    def replace_current(self, item: Any) -> None:
        """Puts ``item`` where the last ``next()`` came from (for donated buffers)."""
        self.items[self.index] = item


def pool_size(entry_bytes: int, rotate_bytes: int, limit: int = 64) -> int:
    """How many copies of an input of ``entry_bytes`` add up to ``rotate_bytes``.

    >>> pool_size(2**20, 64 * 2**20), pool_size(2**28, 64 * 2**20), pool_size(1, 2**30)
    (64, 1, 64)
    """
    return max(1, min(limit, math.ceil(rotate_bytes / max(entry_bytes, 1))))
