"""How jsoftmax compares with jax.nn, a naive jnp formula, torch and torch.compile.

Run ``python -m benchmarks --quick`` (about 3 minutes on a 2-core CPU) or ``python -m benchmarks``
for the full sweep; ``--help`` lists the filters. From Python, :func:`compare` is the quick A/B
check used during performance work:

    import benchmarks
    report = benchmarks.compare(shapes=[(4096, 4096), (1024, 4096)])
    print(benchmarks.format_headline(report["headline"]))

Importing this package before JAX keeps JAX from preallocating most of the GPU's memory, which
torch needs too; import it first when benchmarking on a GPU.
"""

from __future__ import annotations

import os

# Both frameworks share the GPU in one process: JAX must not grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from collections.abc import Callable, Sequence
from typing import Any

from ._config import CONTENDERS as CONTENDERS
from ._config import HEADLINE_SHAPES as HEADLINE_SHAPES
from ._config import RunConfig as RunConfig
from ._report import format_headline as format_headline
from ._report import format_report as format_report
from ._report import write_outputs as write_outputs
from ._run import run as run
from ._run import stderr_progress


def compare(
    shapes: Sequence[tuple[int, ...]] = HEADLINE_SHAPES,
    *,
    ops: Sequence[str] = ("softmax",),
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
    dtypes: Sequence[str] = ("float32",),
    contenders: Sequence[str] | None = None,
    device: str = "cpu",
    torch_compile: bool = False,
    budget_s: float = 0.5,
    progress: Callable[[str], None] = stderr_progress,
) -> dict[str, Any]:
    """Times jsoftmax against the other contenders on a few shapes, timing only.

    Args:
      shapes: input shapes, normalised over the last axis.
      ops: ``"softmax"`` and/or ``"log_softmax"``.
      passes: any of ``"fwd"``, ``"bwd"``, ``"fwd+bwd"``.
      dtypes: any of ``"float32"``, ``"bfloat16"``, ``"float16"``.
      contenders: names from :data:`CONTENDERS` (default: all that run on ``device``).
      device: ``"cpu"`` or ``"gpu"``.
      torch_compile: include torch.compile (off by default: it compiles each shape).
      budget_s: seconds of samples per case, all contenders together.
      progress: called with one line per case (stderr by default).

    Returns:
      The report dict of :func:`run`: ``report["headline"]`` holds the geometric-mean ratios
      over the headline shapes that were measured, ``report["ratio_summary"]`` the ratios over
      every measured case, ``report["timings"]`` one row per case and contender.
    """
    config = RunConfig(
        device=device,
        quick=True,
        dtypes=tuple(dtypes),
        ops=tuple(ops),
        passes=tuple(passes),
        shapes=tuple(tuple(shape) for shape in shapes),
        contenders=None if contenders is None else tuple(contenders),
        sections=("timing",),
        torch_compile=torch_compile,
        budget_s=budget_s,
        out=None,
        plots=False,
    )
    return run(config, progress)


__all__ = [
    "CONTENDERS",
    "HEADLINE_SHAPES",
    "RunConfig",
    "compare",
    "format_headline",
    "format_report",
    "run",
    "write_outputs",
]
