"""How jsoftmax compares with jax.nn, a naive jnp formula, torch and torch.compile.

``python -m benchmarks --quick`` (about 3 minutes on 2 CPU cores) or ``python -m benchmarks``
(the full set); ``--help`` lists every flag. From Python, :func:`compare` is the quick A/B check
of performance work::

    import benchmarks
    report = benchmarks.compare(shapes=[(4096, 4096), (1024, 4096)])
    print(benchmarks.format_headline(report))

Importing this package before JAX keeps JAX from preallocating most of a GPU's memory, which
torch needs too. It imports neither JAX nor torch itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from collections.abc import Sequence
from typing import Any

from ._plan import HEADLINE_PASSES, HEADLINE_SHAPES, RunConfig
from ._report import format_headline, format_report


def compare(
    shapes: Sequence[tuple[int, ...]] = HEADLINE_SHAPES,
    *,
    ops: Sequence[str] = ("softmax",),
    passes: Sequence[str] = HEADLINE_PASSES,
    contenders: Sequence[str] = ("jsoftmax", "jax.nn", "torch"),
    device: str = "cpu",
    budget_s: float = 0.5,
) -> dict[str, Any]:
    """Times jsoftmax against other contenders on a few float32 shapes, timing only.

    Returns the report dict: ``report["headline"]`` holds the geometric-mean ratios over the
    headline shapes measured, ``report["summary"]`` over every case, ``report["rows"]`` one row
    per case and contender.
    """
    from ._sections import run

    config = RunConfig(
        device=device,
        quick=True,
        dtypes=("float32",),
        ops=tuple(ops),
        passes=tuple(passes),
        shapes=tuple(map(tuple, shapes)),
        contenders=tuple(contenders),
        sections=("timing",),
        budget_s=budget_s,
        out=None,
    )
    return run(config, progress=lambda line: None)


__all__ = ["HEADLINE_SHAPES", "RunConfig", "compare", "format_headline", "format_report"]
