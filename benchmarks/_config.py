"""What a run measures: the shape suites, dtypes, passes, contenders and the run's settings.

A *case* is one timed measurement: (op, shape, axis, dtype, pass). The suites below list the
shapes; :func:`plan_cases` expands them into cases for a device and a ``--quick`` or full run, and
drops duplicates (4096x4096 is both a headline shape and a point of the Triton sweep).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

OPS = ("softmax", "log_softmax")
PASSES = ("fwd", "bwd", "fwd+bwd")
# Bytes a pass must move at minimum, in units of the input's size: forward reads x and writes y;
# backward reads y and dy and writes dx; forward+backward does both.
MODEL_BYTES_FACTOR = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}

DTYPE_ALIASES = {
    "f32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f16": "float16",
    "float16": "float16",
}
DTYPE_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "gpu": ("float32", "bfloat16", "float16")}

# The contenders in table order. "xla-fused" (the naive formula under jit, left to XLA's own
# softmax fusion) only means something on GPU; on CPU jit it is jax.nn's computation again.
JAX_CONTENDERS = ("jsoftmax", "jax.nn", "jnp-naive", "xla-fused")
TORCH_CONTENDERS = ("torch", "torch.compile")
CONTENDERS = JAX_CONTENDERS + TORCH_CONTENDERS
GPU_ONLY_CONTENDERS = ("xla-fused",)
# Reference rows measured alongside the contenders; they never count as "best other".
COPY_ROWS = ("copy:torch", "copy:jax")

SECTIONS = ("timing", "accuracy", "interop", "overhead", "cross_entropy")

# The lead's A/B set for performance work: geometric-mean ratios over these (f32, last axis).
HEADLINE_SHAPES: tuple[tuple[int, ...], ...] = (
    (4096, 4096),
    (256, 32768),
    (16384, 1000),
    (1024, 4096),
    (64, 4096),
)
HEADLINE_DTYPE = "float32"
# The smoke test's sweep: one headline shape (so the headline is computed; every op and pass) and
# two 4096 x N shapes (so the bandwidth plot is drawn; softmax forward only), all small.
SMOKE_SHAPES: tuple[tuple[int, ...], ...] = ((64, 4096), (4096, 16), (4096, 64))
# Quick runs time the backward alone (float32) and the low-precision dtypes (fwd, fwd+bwd) on
# this shape only.
QUICK_DETAIL_SHAPE = (1024, 4096)
HEADLINE_PASSES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """A shape of a suite, the axis it is normalised over and the ops and passes it runs."""

    suite: str
    shape: tuple[int, ...]
    axis: int = -1
    ops: tuple[str, ...] = OPS
    passes: tuple[str, ...] = PASSES


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed measurement; ``suites`` lists every suite that asked for it."""

    op: str
    shape: tuple[int, ...]
    axis: int
    dtype: str
    pass_: str
    suites: tuple[str, ...]

    @property
    def size(self) -> int:
        """Number of elements of the input."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def row_length(self) -> int:
        """Length of the normalised axis."""
        return self.shape[self.axis]

    def label(self) -> str:
        """``op dtype pass shape[axis]``, e.g. ``softmax f32 fwd 64x4096``."""
        return (
            f"{self.op} {DTYPE_SHORT.get(self.dtype, self.dtype)} {self.pass_} "
            f"{shape_label(self.shape, self.axis)}"
        )


def shape_label(shape: Iterable[int], axis: int = -1) -> str:
    """``64x4096``; a non-last axis is named: ``32x1024x128 (axis 1)``.

    >>> shape_label((64, 4096)), shape_label((32, 1024, 128), axis=1)
    ('64x4096', '32x1024x128 (axis 1)')
    """
    dims = tuple(shape)
    text = "x".join(str(dim) for dim in dims)
    if axis % len(dims) != len(dims) - 1:
        text += f" (axis {axis % len(dims)})"
    return text


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Parses ``"4096x4096,1024x4096"`` into shapes.

    >>> parse_shapes("4096x4096, 8x16x128")
    ((4096, 4096), (8, 16, 128))
    """
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            dims = tuple(int(part) for part in item.lower().split("x"))
        except ValueError as err:
            raise ValueError(
                f"benchmarks: --shapes expected sizes like 4096x4096,1024x4096, got {item!r}"
            ) from err
        if not dims or any(dim < 1 for dim in dims):
            raise ValueError(f"benchmarks: --shapes expected positive sizes, got {item!r}")
        shapes.append(dims)
    if not shapes:
        raise ValueError(f"benchmarks: --shapes expected at least one shape, got {text!r}")
    return tuple(shapes)


def suite_shapes(device: str, quick: bool) -> list[ShapeSpec]:
    """The shapes of every suite for a device, in run order.

    The CPU subsets fit 2 cores and 24 GiB in the time the issue allows: the Triton sweep runs
    softmax only and fewer row lengths, LM logits stop at 128 tokens (128x128256 is as large as
    4096x4096), and bf16 is timed on the headline and sweep shapes only (see plan_cases).
    """
    if quick:
        # The headline needs fwd and fwd+bwd; the backward alone is timed on one shape.
        headline = [
            ShapeSpec(
                "headline",
                shape,
                passes=PASSES if shape == QUICK_DETAIL_SHAPE else ("fwd", "fwd+bwd"),
            )
            for shape in HEADLINE_SHAPES
        ]
        sweep = [
            ShapeSpec("triton", (4096, n), ops=("softmax",), passes=("fwd",))
            for n in (256, 1024, 2048, 4096)
        ]
        lm = [ShapeSpec("lm", (512, 32000), ops=("log_softmax",), passes=("fwd",))]
        return headline + sweep + lm
    headline = [ShapeSpec("headline", shape) for shape in HEADLINE_SHAPES]
    gpu = device == "gpu"
    row_lengths: tuple[int, ...]
    if gpu:
        row_lengths = (256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 8192, 10240, 12672)
        tokens: tuple[int, ...] = (1, 512, 8192)
        attention = [(32, 64, 128, 128), (8, 16, 2048, 2048)]
    else:
        row_lengths = (256, 1024, 2048, 4096, 12672)
        tokens = (1, 128)
        attention = [(32, 64, 128, 128)]
    sweep = [ShapeSpec("triton", (4096, n), ops=("softmax",)) for n in row_lengths]
    lm = [ShapeSpec("lm", (t, vocab)) for vocab in (32000, 128256) for t in tokens]
    return [
        *headline,
        *sweep,
        *lm,
        *(ShapeSpec("attention", shape) for shape in attention),
        ShapeSpec("classification", (128, 1000)),
        ShapeSpec("classification", (1024, 1000)),
        ShapeSpec("non-last-axis", (32, 1024, 128), axis=1),
    ]


@dataclasses.dataclass
class RunConfig:
    """Settings of one run. ``None`` fields take the device's and mode's defaults."""

    device: str = "cpu"
    quick: bool = False
    dtypes: tuple[str, ...] | None = None
    ops: tuple[str, ...] = OPS
    passes: tuple[str, ...] = PASSES
    shapes: tuple[tuple[int, ...], ...] | None = None
    axis: int = -1
    suites: tuple[str, ...] | None = None
    contenders: tuple[str, ...] | None = None
    sections: tuple[str, ...] = SECTIONS
    torch_compile: bool | None = None
    budget_s: float | None = None
    out: Path | None = Path("bench-results")
    plots: bool = True
    keep_samples: bool = False
    seed: int = 0
    # Tiny sizes and 3 rounds everywhere: for the CI smoke test, whose figures mean nothing.
    smoke: bool = False
    # The command line that asked for this run, recorded with its figures.
    command: str | None = None
    # Merge into the results already in ``out`` instead of replacing them (CLI only).
    merge: bool = False
    # Let glibc keep freed memory for large blocks (see _environment.keep_freed_memory).
    malloc_reuse: bool = False

    def resolved_dtypes(self) -> tuple[str, ...]:
        return self.dtypes if self.dtypes is not None else DEFAULT_DTYPES[self.device]

    def resolved_contenders(self) -> tuple[str, ...]:
        names = self.contenders if self.contenders is not None else CONTENDERS
        if self.device != "gpu":
            names = tuple(name for name in names if name not in GPU_ONLY_CONTENDERS)
        if not self.use_torch_compile():
            names = tuple(name for name in names if name != "torch.compile")
        return names

    def use_torch_compile(self) -> bool:
        if self.torch_compile is not None:
            return self.torch_compile
        # torch.compile builds one C++ kernel per shape and dtype on CPU (1-2 s each, 30 s for
        # the first): the quick CPU run keeps it for the headline shapes only (see plan_cases).
        return True

    def case_budget_s(self) -> float:
        """Seconds of timed samples per case (all contenders together)."""
        if self.budget_s is not None:
            return self.budget_s
        return 0.25 if self.quick else 1.0

    def extra_budget_s(self) -> float:
        """Seconds of samples per measurement of the accuracy-free extra sections."""
        return min(self.case_budget_s(), 0.5)

    def min_rounds(self) -> int:
        if self.smoke:
            return 3
        return 5 if self.quick else 7

    def max_rounds(self) -> int:
        if self.smoke:
            return 3
        return 15 if self.quick else 41

    def accuracy_shape(self) -> tuple[int, ...]:
        if self.smoke:
            return (8, 256)
        return (64, 4096) if self.quick else (256, 4096)


def plan_cases(config: RunConfig) -> list[Case]:
    """Expands the suites (or ``config.shapes``) into cases, without duplicates."""
    if config.shapes is not None:
        specs = [ShapeSpec("custom", shape, axis=config.axis) for shape in config.shapes]
    elif config.smoke:
        first, *sweep = SMOKE_SHAPES
        specs = [ShapeSpec("smoke", first)]
        specs += [ShapeSpec("smoke", shape, ops=("softmax",), passes=("fwd",)) for shape in sweep]
    else:
        specs = suite_shapes(config.device, config.quick)
        if config.suites is not None:
            specs = [spec for spec in specs if spec.suite in config.suites]
    dtypes = config.resolved_dtypes()
    suites_of: dict[tuple[str, tuple[int, ...], int, str, str], list[str]] = {}
    for spec in specs:
        axis = spec.axis % len(spec.shape)
        for dtype in dtypes:
            if config.shapes is None and dtype != "float32":
                # Low precision on CPU: quick runs time one shape, full runs the headline and
                # the sweep (the bandwidth plot); GPU runs time it everywhere.
                if config.quick and spec.shape != QUICK_DETAIL_SHAPE:
                    continue
                if config.device == "cpu" and spec.suite not in ("headline", "triton"):
                    continue
            for op in spec.ops:
                if op not in config.ops:
                    continue
                for pass_ in spec.passes:
                    if pass_ not in config.passes:
                        continue
                    quick_low_precision = (
                        config.quick and config.shapes is None and dtype != "float32"
                    )
                    if quick_low_precision and pass_ == "bwd":
                        continue
                    key = (op, spec.shape, axis, dtype, pass_)
                    suites_of.setdefault(key, [])
                    if spec.suite not in suites_of[key]:
                        suites_of[key].append(spec.suite)
    return [
        Case(op, shape, axis, dtype, pass_, tuple(suites))
        for (op, shape, axis, dtype, pass_), suites in suites_of.items()
    ]


def compile_case(config: RunConfig, shape: tuple[int, ...], dtype: str) -> bool:
    """Whether torch.compile runs for a shape and dtype (quick CPU runs: headline f32 only)."""
    if not config.use_torch_compile():
        return False
    if config.quick and config.device == "cpu" and config.shapes is None:
        return shape in HEADLINE_SHAPES and dtype == "float32"
    return True


def case_contenders(config: RunConfig, case: Case) -> tuple[str, ...]:
    """The contenders timed in a case.

    torch.compile follows :func:`compile_case`. Quick runs of the suites time the unfused
    jnp-naive formula forward only: op by op, its backward is the slowest call of a run by far and
    adds nothing the forward does not already show.
    """
    names = []
    for name in config.resolved_contenders():
        if name == "torch.compile" and not compile_case(config, case.shape, case.dtype):
            continue
        if name == "jnp-naive" and config.quick and config.shapes is None and case.pass_ != "fwd":
            continue
        names.append(name)
    return tuple(names)
