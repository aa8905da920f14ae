"""The Pallas kernel for long rows (jsoftmax/_gpu.py), run by Pallas' interpreter on CPU.

On a GPU it replaces XLA's five kernels for rows of 64k+ entries (its compilation for the H100 is
checked in tests/test_accelerators.py); here its values are checked against the formula that
every other path computes, on the rows where the rules differ from the textbook formula.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_logits, ref_log_softmax, ref_softmax, to_f64, tolerance

from jsoftmax import _formula, _gpu

pytest.importorskip("jax.experimental.pallas")


def _rows(n: int, dtype: str) -> jnp.ndarray:
    x = np.array(random_logits((6, n), seed=70), np.float32) * 4
    x[1, 5] = x[1, n - 3] = np.inf  # two +inf entries share the row
    x[2] = -np.inf  # fully masked
    x[3, ::3] = -np.inf  # masked entries
    x[4, n // 2] = np.nan
    x[5, :4096] = -np.inf  # a first block with nothing in it
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [4096 * 2 + 5, 65536])
def test_long_rows_follow_the_rules(log, dtype, n):
    x = _rows(n, dtype)
    got = to_f64(_gpu.long_rows(x, log=log, interpret=True))
    # The finite rows against float64; every row against the formula the other paths compute.
    finite = [0, 3]
    expected = (ref_log_softmax if log else ref_softmax)(to_f64(x)[finite], -1)
    np.testing.assert_allclose(got[finite], expected, **tolerance(dtype))
    formula = to_f64(_formula.normalize(x, (1,), None, log))
    np.testing.assert_allclose(got, formula, **tolerance(dtype))
    assert np.isnan(got[4]).all() and not np.isnan(np.delete(got, 4, axis=0)).any()
    assert got[1, 5] == pytest.approx(-np.log(2) if log else 0.5, rel=1e-2)
    np.testing.assert_array_equal(got[2], -np.inf if log else 0.0)


def test_applies_to_one_long_trailing_axis_only():
    assert _gpu.applies((64, 262144), (1,))
    assert not _gpu.applies((64, 4096), (1,))
    assert not _gpu.applies((262144, 64), (0,))
    assert not _gpu.applies((4, 256, 256), (1, 2))
