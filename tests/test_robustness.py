"""Inputs found by trying to break jsoftmax (issue 12): errors that name the function and the
argument, jax.nn's dtype rules for integer input, TorchScript, and fork-safe DataLoaders."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import pytest
from _helpers import enable_x64

import jsoftmax

FUNCTIONS = {
    "softmax": (jsoftmax.softmax, jax.nn.softmax),
    "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax),
    "logsumexp": (jsoftmax.logsumexp, jax.scipy.special.logsumexp),
}
INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


# --------------------------------------------------------------------------------------------
# 12.6: integer input promotes as jax.nn promotes it, with x64 on and off


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_integer_input_promotes_as_jax_nn(name, dtype, x64):
    ours, theirs = FUNCTIONS[name]
    values = np.array([[1, 0, 3], [2, 2, 0]])
    # Both orders in one process: a cached decision must not outlive the x64 setting.
    for enabled in (not x64, x64):
        with enable_x64() if enabled else _no_x64():
            x = jnp.asarray(values.astype(dtype))
            expected = theirs(x, axis=-1)
            result = ours(x, axis=-1)
            assert result.dtype == expected.dtype, (enabled, result.dtype, expected.dtype)
            # jax.nn's unsigned x - max wraps around before the cast: compare values from floats.
            exact = theirs(x.astype(expected.dtype), axis=-1)
            np.testing.assert_allclose(result, exact, rtol=1e-6)


@pytest.mark.parametrize("x64", [False, True])
def test_bool_input(x64):
    # jax.nn.softmax rejects bool (its subtraction does); jax.scipy's logsumexp promotes it to
    # float32. jsoftmax promotes bool as logsumexp does, for all three.
    with enable_x64() if x64 else _no_x64():
        x = jnp.array([True, False, True])
        with pytest.raises(TypeError):
            jax.nn.softmax(x)
        expected = jax.scipy.special.logsumexp(x)
        assert jsoftmax.logsumexp(x).dtype == expected.dtype == jnp.float32
        np.testing.assert_allclose(jsoftmax.logsumexp(x), expected, rtol=1e-6)
        assert jsoftmax.softmax(x).dtype == jnp.float32
        np.testing.assert_allclose(jsoftmax.softmax(x), jax.nn.softmax(x.astype(float)), rtol=1e-6)


def _no_x64():
    return jax.enable_x64(False)


# --------------------------------------------------------------------------------------------
# 12.5: errors that name the function and the argument


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (np.array(["a", "b"]), "<U1"),
        (np.array([1.0, "a"], dtype=object), "object"),
        (np.array([1.0, 2.0], dtype=object), "object"),
        (np.str_("a"), "<U1"),
        (np.array([b"a"]), "|S1"),
    ],
)
def test_non_numeric_arrays_are_type_errors_naming_the_argument(name, value, kind):
    ours, _ = FUNCTIONS[name]
    with pytest.raises(
        TypeError, match=rf"^{name}: x expected .*numeric.*, got dtype {re.escape(kind)}"
    ):
        ours(value)


def test_non_numeric_where_and_labels_are_type_errors():
    with pytest.raises(TypeError, match=r"^softmax: where expected a boolean array"):
        jsoftmax.softmax(jnp.ones(2), where=np.array(["a", "b"]))
    with pytest.raises(TypeError, match=r"^cross_entropy: labels expected"):
        jsoftmax.cross_entropy(jnp.ones((1, 2)), np.array(["a"]))
    with pytest.raises(TypeError, match=r"^cross_entropy: weight expected"):
        jsoftmax.cross_entropy(jnp.ones((1, 2)), jnp.array([0]), weight=np.array(["a", "b"]))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("value", [3.0, 3, np.float32(3.0), jnp.float32(3.0)])
def test_scalar_with_the_default_axis_says_what_to_pass(name, value):
    ours, theirs = FUNCTIONS[name]
    # jax.nn raises too (axis -1 is out of bounds for a 0-d array); jsoftmax says what to do.
    with pytest.raises(ValueError):
        theirs(value, axis=-1)
    with pytest.raises(ValueError, match=rf"^{name}: axis expected None or \(\) for a 0-d x"):
        ours(value)
    # The spelled-out request works: a scalar is its own (single-element) slice.
    expected = {"softmax": 1.0, "log_softmax": 0.0, "logsumexp": 3.0}[name]
    assert float(ours(value, axis=None)) == expected
    assert float(ours(value, axis=())) == expected


@pytest.mark.parametrize("ignore_index", [2**40, -(2**40), 2**70])
def test_ignore_index_outside_the_labels_dtype_is_a_value_error(ignore_index):
    logits, labels = jnp.ones((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match=r"^cross_entropy: ignore_index expected an int in"):
        jsoftmax.cross_entropy(logits, labels, ignore_index=ignore_index)


def test_ignore_index_in_range_of_64_bit_labels_works_with_x64():
    with enable_x64():
        logits, labels = jnp.ones((2, 3)), jnp.array([0, 2**40], dtype=jnp.int64)
        loss = jsoftmax.cross_entropy(logits, labels, ignore_index=2**40, reduction="none")
        np.testing.assert_allclose(loss, [np.log(3.0), 0.0], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# torch side


torch = pytest.importorskip("torch")
from jsoftmax import interop  # noqa: E402


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (interop.Softmax, torch.nn.Softmax),
        (interop.LogSoftmax, torch.nn.LogSoftmax),
    ],
)
@pytest.mark.parametrize(("shape", "dim"), [((3, 4), 1), ((3, 4), -2), ((), 0), ((5,), -1)])
def test_modules_script_like_torchs(ours, theirs, shape, dim):
    scripted = torch.jit.script(ours(dim))
    reference = torch.jit.script(theirs(dim))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    outs = [scripted(leaves[0]), reference(leaves[1])]
    torch.testing.assert_close(outs[0], outs[1])
    weights = torch.linspace(0.5, 1.5, max(x.numel(), 1), dtype=torch.float64).view(shape)
    for out in outs:
        (out * weights).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad)


def test_scripted_module_raises_as_torch_does():
    scripted = torch.jit.script(interop.Softmax(2))
    with pytest.raises(Exception, match="Softmax: dim expected an int in"):
        scripted(torch.ones(3, 4))
    with pytest.raises(Exception, match="Softmax: input expected a floating tensor"):
        scripted(torch.ones(3, 4, 5, dtype=torch.int64))


# 12.7: a DataLoader with fork workers hangs once JAX has started (JAX's behaviour); the
# documented way, spawn workers, works. Run in a child process with a hard timeout.
_SPAWN_LOADER = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from jsoftmax import interop

    if __name__ == "__main__":
        # JAX has started in this process (its thread pools exist) before the loader starts.
        interop.softmax(torch.ones(2, 3), dim=1)
        data = TensorDataset(torch.arange(12.0).reshape(4, 3))
        loader = DataLoader(data, batch_size=2, num_workers=1, multiprocessing_context="spawn")
        total = torch.zeros(())
        for (batch,) in loader:
            total += interop.softmax(batch, dim=1).sum()
        print("rows", round(float(total), 4))
    """
)


def test_dataloader_with_spawn_workers_works_after_jax_starts(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(_SPAWN_LOADER)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows 4.0" in result.stdout


def test_interop_docs_say_fork_hangs_and_to_use_spawn():
    doc = interop.__doc__ or ""
    assert "fork" in doc and 'multiprocessing_context="spawn"' in doc


def test_interop_ignore_index_beyond_int32():
    logits = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2**40, 3])
    ours = interop.cross_entropy(logits, target, ignore_index=2**40)  # int64: x64 holds it
    theirs = torch.nn.functional.cross_entropy(logits, target, ignore_index=2**40)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match=r"^cross_entropy: ignore_index expected an int in"):
        interop.cross_entropy(logits, target.to(torch.int32) * 0, ignore_index=2**40)
