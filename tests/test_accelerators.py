"""Kernel counts on accelerators: XLA's own H100 and TPU v5e compilers, ahead of time, on CPU.

Each case compiles jsoftmax and its reference (jax.nn; optax's integer-label cross-entropy, mean)
for the chip and counts the kernels (fusions) the chip would launch: jsoftmax must launch no more.
The compilers live in a venv of their own (the CUDA plugin would otherwise start in every
process): ``JSOFTMAX_AOT_PYTHON`` names its interpreter and ``JSOFTMAX_AOT_TOOL`` the xla-aot
folder; ``.ci/run`` makes both. Without them the module is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AOT_PYTHON = os.environ.get("JSOFTMAX_AOT_PYTHON", "")
AOT_TOOL = os.environ.get("JSOFTMAX_AOT_TOOL", str(REPO.parent / "shared" / "tools" / "xla-aot"))

if not (AOT_PYTHON and Path(AOT_PYTHON).exists() and Path(AOT_TOOL, "aot.py").exists()):
    if os.environ.get("CI"):
        raise RuntimeError(
            "tests/test_accelerators.py: CI must set JSOFTMAX_AOT_PYTHON and JSOFTMAX_AOT_TOOL"
        )
    pytest.skip(
        "the xla-aot compilers are not installed (JSOFTMAX_AOT_PYTHON)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    done = subprocess.run(
        [AOT_PYTHON, str(REPO / "tests" / "aot_kernel_counts.py"), AOT_TOOL],
        capture_output=True, text=True, timeout=1500, cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_names() -> list[str]:
    # The same enumeration as the script, without importing it (it needs the compilers).
    shapes = ("4096x4096", "16384x1000", "64x262144")
    dtype_shapes = [(d, s) for d in ("float32", "bfloat16") for s in shapes]
    dtype_shapes.append(("float16", shapes[0]))
    names = []
    for target in ("h100", "v5e"):
        for op in ("softmax", "log_softmax", "logsumexp"):
            for dtype, shape in dtype_shapes:
                for mask in ("", "/where"):
                    for passname in ("fwd", "grad"):
                        names.append(f"{target}/{op}/{passname}/{dtype}/{shape}{mask}")
        for dtype in ("float32", "bfloat16"):
            for mask in ("", "/where"):
                for passname in ("fwd", "grad"):
                    names.append(f"{target}/cross_entropy/{passname}/{dtype}/4096x32000{mask}")
    return names


@pytest.mark.parametrize("case", _case_names())
def test_no_more_kernels_than_the_reference(counts, case):
    assert case in counts, sorted(counts)[:5]
    got = counts[case]
    assert got["jsoftmax"] <= got["reference"], got


def test_one_kernel_per_pass_on_the_h100_wherever_jax_nn_has_one(counts):
    single = [
        case
        for case, got in counts.items()
        if case.startswith("h100/") and "/logsumexp/" not in case and got["reference"] == 1
    ]
    assert len(single) >= 12, single  # the 4096x4096 and 16384x1000 softmax / log_softmax cases
    assert all(counts[case]["jsoftmax"] == 1 for case in single), {c: counts[c] for c in single}


def test_long_rows_take_one_kernel_on_the_h100_where_jax_nn_takes_five(counts):
    # The Pallas kernel of jsoftmax/_gpu.py (64x262144: XLA's one-kernel softmax does not apply).
    for op in ("softmax", "log_softmax"):
        for dtype in ("float32", "bfloat16"):
            got = counts[f"h100/{op}/fwd/{dtype}/64x262144"]
            assert got["jsoftmax"] == 1 and got["reference"] >= 5, (op, dtype, got)
