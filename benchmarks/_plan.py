"""What a run measures: settings, shape suites and the timed cases. Imports nothing heavy.

A *case* is one timed measurement of softmax or log_softmax: (op, shape, axis, dtype, pass).
:func:`plan_cases` expands the suites for a device and a quick or full run, without duplicates.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

OPS = ("softmax", "log_softmax")
PASSES = ("fwd", "bwd", "fwd+bwd")
# Bytes a pass must move, in units of the input's size: forward reads x and writes y; backward
# reads y and dy and writes dx; both together 5.
BYTES_FACTOR = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "copy": 2}
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
SHORT = {name: short for short, name in DTYPES.items()}
# Table order. "xla-fused" is the naive formula under jit, left to XLA's own softmax fusion: GPU
# only (on CPU it is jax.nn's computation again). "jnp-naive" runs the same formula op by op.
CONTENDERS = ("jsoftmax", "jax.nn", "jnp-naive", "xla-fused", "torch", "torch.compile")
COPIES = ("copy:torch", "copy:jax")  # the bandwidth reference, never a contender
SECTIONS = ("timing", "accuracy", "interop", "overhead", "cross_entropy", "plain", "steps")
FULL_ONLY = ("plain", "steps")  # the issue-14 sections, left out of --quick
SUITES = ("headline", "sweep", "lm", "attention", "classification", "non-last-axis")
# The A/B set of performance work: geometric-mean ratios over these, float32, last axis.
HEADLINE_SHAPES: tuple[tuple[int, ...], ...] = (
    (4096, 4096),
    (256, 32768),
    (16384, 1000),
    (1024, 4096),
    (64, 4096),
)
HEADLINE_PASSES = ("fwd", "fwd+bwd")
DETAIL_SHAPE = (1024, 4096)  # quick runs time bwd alone and low precision on this shape only
GPU_SWEEP_ELEMENTS = 2**26  # GPU sweep: rows x N = 64 Mi elements (256 MiB in f32), N 1k..256k


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    axis: int
    dtype: str
    pass_: str
    suites: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        """``softmax f32 fwd 64x4096``."""
        return f"{self.op} {SHORT.get(self.dtype, self.dtype)} {self.pass_} " + shape_label(
            self.shape, self.axis
        )


def shape_label(shape: tuple[int, ...] | list[int], axis: int = -1) -> str:
    """``64x4096``; a non-last axis is named.

    >>> shape_label((64, 4096)), shape_label((32, 1024, 128), axis=1)
    ('64x4096', '32x1024x128 (axis 1)')
    """
    text = "x".join(str(dim) for dim in shape)
    return text if axis % len(shape) == len(shape) - 1 else f"{text} (axis {axis % len(shape)})"


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"4096x4096, 8x16x128"`` -> ``((4096, 4096), (8, 16, 128))``; ValueError otherwise.

    >>> parse_shapes("4096x4096, 8x16x128")
    ((4096, 4096), (8, 16, 128))
    """
    try:
        shapes = tuple(tuple(int(d) for d in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(dim < 1 for shape in shapes for dim in shape):
        raise ValueError(f"--shapes expected sizes like 4096x4096,1024x4096, got {text!r}")
    return shapes


@dataclasses.dataclass
class RunConfig:
    """Settings of one run; ``None`` fields take the device's and mode's defaults."""

    device: str = "cpu"
    quick: bool = False
    smoke: bool = False  # tiny sizes, 3 rounds: checks the plumbing (tests); figures mean nothing
    dtypes: tuple[str, ...] | None = None
    ops: tuple[str, ...] = OPS
    passes: tuple[str, ...] = PASSES
    shapes: tuple[tuple[int, ...], ...] | None = None
    axis: int = -1
    suites: tuple[str, ...] = SUITES
    contenders: tuple[str, ...] = CONTENDERS
    sections: tuple[str, ...] | None = None
    torch_compile: bool = True
    budget_s: float | None = None
    settle_s: float | None = None
    time_limit_s: float | None = None
    out: Path | None = Path("bench-results")
    plots: bool = True
    keep_samples: bool = False
    malloc_reuse: bool = False
    merge: bool = False
    seed: int = 0
    command: str = "python -m benchmarks"

    def resolved_sections(self) -> tuple[str, ...]:
        if self.sections is not None:
            return self.sections
        skipped = FULL_ONLY if self.quick and not self.smoke else ()  # smoke: every section
        return tuple(s for s in SECTIONS if s not in skipped)

    def resolved_dtypes(self) -> tuple[str, ...]:
        if self.dtypes is not None:
            return self.dtypes
        if self.smoke:
            return ("float32",)
        return ("float32", "bfloat16") if self.device == "cpu" or self.quick else tuple(SHORT)

    def budget(self) -> float:
        """Seconds of interleaved samples per case, all contenders together."""
        return self.budget_s if self.budget_s is not None else 0.25 if self.quick else 1.0

    def settle(self) -> float:
        """Seconds of idling before each sample (see benchmarks/_measure.py): 10 ms on CPU, where
        torch's OpenMP workers spin for 5-10 ms after a call; none on GPU or in a smoke run."""
        if self.settle_s is not None:
            return self.settle_s
        return 0.01 if self.device == "cpu" and not self.smoke else 0.0

    def rounds(self) -> tuple[int, int]:
        """Fewest and most samples per contender and case."""
        return (3, 3) if self.smoke else (5, 15) if self.quick else (7, 41)

    def compiles(self, case: Case) -> bool:
        """torch.compile builds a kernel per case (1-2 s on CPU): quick runs keep it for the
        float32 headline shapes, forward only."""
        if not self.torch_compile or "torch.compile" not in self.contenders:
            return False
        if self.quick and self.shapes is None:
            return "headline" in case.suites and case.dtype == "float32" and case.pass_ == "fwd"
        return True

    def case_contenders(self, case: Case) -> tuple[str, ...]:
        names = [name for name in self.contenders if name != "torch.compile" or self.compiles(case)]
        if self.device != "gpu":
            names = [name for name in names if name != "xla-fused"]
        naive = case.pass_ == "fwd" and (case.shape == DETAIL_SHAPE or case.suites != ("headline",))
        if self.quick and self.shapes is None and not naive:
            # Op by op, the naive formula is the slowest call and never the best other: quick
            # runs time its forward on the sweep and on one headline shape.
            names = [name for name in names if name != "jnp-naive"]
        return tuple(names)


Spec = tuple[str, tuple[int, ...], int, tuple[str, ...]]  # suite, shape, axis, ops


def _suite_shapes(config: RunConfig) -> list[Spec]:
    """(suite, shape, axis, ops) in run order."""
    gpu = config.device == "gpu"
    if config.smoke:  # one headline shape (every op and pass) and a two-point sweep
        return [("headline", (64, 4096), -1, OPS)] + [
            ("sweep", (4096, n), -1, ("softmax",)) for n in (16, 64)
        ]
    if gpu:
        sweep = [(GPU_SWEEP_ELEMENTS // 2**k, 2**k) for k in range(10, 19)]
    elif config.quick:
        sweep = [(4096, n) for n in (256, 1024, 2048, 4096)]
    else:
        sweep = [(4096, n) for n in (256, 1024, 2048, 4096, 12672)]
    specs: list[Spec] = [("headline", shape, -1, OPS) for shape in HEADLINE_SHAPES]
    specs += [("sweep", shape, -1, ("softmax",)) for shape in sweep]
    if config.quick:
        return specs if gpu else [*specs, ("lm", (512, 32000), -1, ("log_softmax",))]
    tokens = (1, 512, 8192) if gpu else (1, 128)
    specs += [("lm", (t, vocab), -1, OPS) for vocab in (32000, 128256) for t in tokens]
    attention = [(32, 64, 128, 128), (8, 16, 2048, 2048)] if gpu else [(32, 64, 128, 128)]
    specs += [("attention", shape, -1, OPS) for shape in attention]
    specs += [("classification", (rows, 1000), -1, OPS) for rows in (128, 1024)]
    return [*specs, ("non-last-axis", (32, 1024, 128), 1, OPS)]


def plan_cases(config: RunConfig) -> list[Case]:
    """The timed cases of a run, in order, each once (with every suite that asked for it)."""
    specs: list[Spec]
    if config.shapes is not None:
        specs = [("custom", shape, config.axis, OPS) for shape in config.shapes]
    else:
        specs = [spec for spec in _suite_shapes(config) if spec[0] in config.suites]
    detail = (64, 4096) if config.smoke else DETAIL_SHAPE
    quick, cpu = config.quick and config.shapes is None, config.device == "cpu"
    planned: dict[tuple[str, tuple[int, ...], int, str, str], list[str]] = {}
    for suite, shape, axis, ops in specs:
        for dtype in config.resolved_dtypes():
            low = dtype != "float32" and config.shapes is None
            if low and cpu and (shape != detail if quick else suite not in ("headline", "sweep")):
                continue  # low precision on CPU: one shape (quick), headline and sweep (full)
            for op, pass_ in itertools.product(ops, PASSES):
                if op not in config.ops or pass_ not in config.passes:
                    continue
                if quick and pass_ == "bwd" and (low or shape != detail):
                    continue  # quick runs time the backward alone on one shape
                if quick and cpu and suite != "headline" and pass_ != "fwd":
                    continue
                planned.setdefault((op, shape, axis % len(shape), dtype, pass_), []).append(suite)
    return [
        Case(op, shape, axis, dtype, pass_, tuple(dict.fromkeys(suites)))
        for (op, shape, axis, dtype, pass_), suites in planned.items()
    ]
