"""The one measuring loop: every contender of a group is sampled in turn, round after round.

On a shared machine the load changes by the second; sampling round-robin, every contender once
per round in an order drawn afresh each round (seeded), exposes every contender to the same
conditions, and the 20th and 80th percentiles say how much the conditions moved. The order is
shuffled, not rotated: a contender leaves effects behind for whichever runs next (torch's OpenMP
threads keep spinning on the cores after a call returns), and a rotation keeps the same
neighbours in every round, so the contender after torch would always pay for it. The first call
(tracing, compiling, first touch) is timed apart; warm-up calls take every input of the rotation
pool through once.

Shuffling spreads those effects but does not remove them, and they are not even: on a 2-core
CPU, torch's OpenMP workers spin for 5-10 ms after a call returns (libgomp's spin count), so
the contender sampled next loses a core for that long (64x4096 log_softmax, a jsoftmax sample
of 50 calls: 107 us a call after torch, 72 after jax.nn; torch after jsoftmax 94, after torch
87). On CPU each sample therefore starts after ``settle_s`` of idling, long enough for those
workers to stop (7.5 ms was here), and, when it is made of several calls, with one untimed call
that wakes the contender's own threads after the idle time (without it, 20 ms of idling made the
next jsoftmax sample 40% slower). Each contender is then measured in its own steady state, as a
program that calls only it would see it; a program that interleaves torch and JAX calls pays
the cost above, which a run with ``--settle 0`` shows.
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
    """A prepared contender: ``step()`` makes one call, ``sync(out)`` waits for its result."""

    name: str
    step: Callable[[], Any]
    sync: Callable[[Any], None] = lambda out: None
    cuda_events: bool = False  # time with CUDA events (torch on GPU) instead of the host clock
    warmup_calls: int = 2
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the row


class Rotation:
    """Cycles through a pool of inputs, so consecutive calls do not find theirs in cache.

    >>> pool = Rotation(["a", "b"])
    >>> [pool.next() for _ in range(3)]
    ['a', 'b', 'a']
    """

    def __init__(self, items: Sequence[Any]) -> None:
        self.items, self.index = list(items), -1

    def next(self) -> Any:
        self.index = (self.index + 1) % len(self.items)
        return self.items[self.index]


def pool_size(entry_bytes: int, rotate_bytes: int) -> int:
    """How many copies of an input make ``rotate_bytes`` (1 to 64).

    >>> pool_size(2**20, 64 * 2**20), pool_size(2**28, 64 * 2**20)
    (64, 1)
    """
    return max(1, min(64, math.ceil(rotate_bytes / max(entry_bytes, 1))))


def _sample(runner: Runner, inner: int, sync_each: bool, settle_s: float = 0.0) -> float:
    """Seconds per call over ``inner`` back-to-back calls, after ``settle_s`` of idling and, for
    ``inner > 1``, one untimed call."""
    if settle_s > 0:
        time.sleep(settle_s)
        if inner > 1:
            runner.sync(runner.step())
    if runner.cuda_events:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def measure(
    runners: Sequence[Runner | tuple[str, BaseException]],
    *,
    budget_s: float,
    rounds: tuple[int, int],
    sync_each: bool = True,
    sample_s: float = 0.004,
    settle_s: float = 0.0,
    keep_samples: bool = False,
) -> list[dict[str, Any]]:
    """Times the runners round-robin, shuffled each round; one row per runner, in order.

    Args:
      runners: prepared runners, or ``(name, error)`` for one that could not be prepared.
      budget_s: seconds of sampling, all runners together: rounds = budget / one round's time,
        clamped to ``rounds = (fewest, most)``.
      sync_each: wait for each call (CPU latency); False on GPU (a sample waits once).
      sample_s: a sample repeats a fast call until it lasts about this long.
      settle_s: seconds of idling before each sample (then one untimed call where the sample
        repeats the call): what the previous contender left running stops first.
      keep_samples: keep the raw per-call samples in the rows.

    Returns:
      Rows with ``contender``, ``median_s``, ``p20_s``, ``p80_s``, ``rounds``, ``first_call_s``
      and the runner's ``extra``; a runner that raised gets ``error`` instead of times.
    """
    rows: dict[str, dict[str, Any]] = {}
    live: list[tuple[Runner, int, list[float]]] = []
    round_s = 0.0
    gc.collect()
    for runner in runners:
        if isinstance(runner, tuple):
            rows[runner[0]] = {"contender": runner[0], "error": _error(runner[1])}
            continue
        rows[runner.name] = {"contender": runner.name, **runner.extra}
        try:
            begin = time.perf_counter()
            runner.sync(runner.step())
            rows[runner.name]["first_call_s"] = time.perf_counter() - begin
            # The fastest warm call sizes the samples: one stalled call must not shrink them.
            warm = [_sample(runner, 1, sync_each) for _ in range(max(1, runner.warmup_calls - 1))]
            while len(warm) < 10 and sum(warm) < 0.02:
                warm.append(_sample(runner, 1, sync_each))
        except Exception as err:  # a contender that cannot run this case is a row, not a crash
            rows[runner.name] = {"contender": runner.name, "error": _error(err)}
            continue
        inner = max(1, min(1000, round(sample_s / max(min(warm), 1e-9))))
        live.append((runner, inner, []))
        round_s += inner * min(warm)
    count = max(rounds[0], min(rounds[1], math.ceil(budget_s / max(round_s, 1e-9))))
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whichever runner it hit
    try:
        shuffle = np.random.default_rng(0)  # the same orders in every run
        for _ in range(count):
            for position in shuffle.permutation(len(live)):
                runner, inner, samples = live[position]
                if rows[runner.name].get("error"):
                    continue
                try:
                    samples.append(_sample(runner, inner, sync_each, settle_s))
                except Exception as err:
                    rows[runner.name] = {"contender": runner.name, "error": _error(err)}
    finally:
        if gc_enabled:
            gc.enable()
    for runner, inner, samples in live:
        row = rows[runner.name]
        if row.get("error"):
            continue
        row.update(
            median_s=float(np.median(samples)),
            p20_s=float(np.percentile(samples, 20)),
            p80_s=float(np.percentile(samples, 80)),
            rounds=len(samples),
            inner=inner,
        )
        row["compile_s"] = max(0.0, row["first_call_s"] - row["median_s"])
        if "model_bytes" in row:
            row["gbps"] = row["model_bytes"] / row["median_s"] / 1e9
        if keep_samples:
            row["samples_s"] = samples
    return list(rows.values())
