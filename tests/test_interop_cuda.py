"""The bridges and the torch-facing softmax on CUDA: zero-copy, streams, devices.

Skipped unless torch sees a CUDA device and JAX has a GPU backend.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jsoftmax import interop


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _jax_has_gpu()),
        reason="needs a CUDA device visible to both torch and JAX",
    ),
]


def _jax_gpu(index: int):
    return next(d for d in jax.devices("gpu") if d.local_hardware_id == index)


@contextlib.contextmanager
def _no_torch_synchronisation():
    """Makes any synchronising torch CUDA call raise inside the block."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_zero_copy_both_ways():
    tensor = torch.arange(1024.0, device="cuda")
    array = interop.from_torch(tensor, copy=False)
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    assert array.devices() == {_jax_gpu(tensor.device.index)}
    back = interop.to_torch(array * 2, copy=False)
    assert back.device == tensor.device
    source = jnp.arange(16.0, device=_jax_gpu(0))
    exported = interop.to_torch(source)
    assert exported.data_ptr() == source.unsafe_buffer_pointer()
    torch.testing.assert_close(back, tensor * 2)


def test_copies_and_layouts_on_cuda():
    base = torch.arange(48.0, device="cuda").reshape(6, 8)
    transposed = interop.from_torch(base.t(), copy=False)
    assert transposed.unsafe_buffer_pointer() == base.data_ptr()
    np.testing.assert_array_equal(np.asarray(transposed), base.t().cpu().numpy())
    stepped = interop.from_torch(base[::2])
    np.testing.assert_array_equal(np.asarray(stepped), base[::2].cpu().numpy())
    private = interop.from_torch(base, copy=True)
    base.add_(1)
    np.testing.assert_array_equal(np.asarray(private), np.arange(48.0).reshape(6, 8))


def test_hand_off_is_ordered_on_streams_without_synchronising():
    side = torch.cuda.Stream()
    with _no_torch_synchronisation():
        with torch.cuda.stream(side):
            # Long enough that an unordered reader would see unfinished work.
            big = torch.ones(4096, 4096, device="cuda")
            for _ in range(8):
                big = big @ big / 4096
            array = interop.from_torch(big[0].contiguous())
        total = jnp.sum(array)
        result = interop.to_torch(jnp.ones((2048, 2048), device=_jax_gpu(0)) @ jnp.ones(2048))
        reduced = result.sum()
    assert float(total) == pytest.approx(4096.0)
    assert reduced.item() == 2048.0 * 2048.0


def test_softmax_forward_and_backward_on_cuda_without_synchronising():
    x = torch.randn(64, 300, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        ours_leaf = x.to(dtype).requires_grad_()
        torch_leaf = x.to(dtype).requires_grad_()
        with _no_torch_synchronisation():
            ours = interop.log_softmax(ours_leaf, 1)
            (ours * torch.arange(300, device="cuda")).sum().backward()
        theirs = torch.log_softmax(torch_leaf, 1)
        (theirs * torch.arange(300, device="cuda")).sum().backward()
        assert ours.device == x.device and ours.dtype == dtype
        tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(ours, theirs, **tolerance)
        torch.testing.assert_close(ours_leaf.grad, torch_leaf.grad, **tolerance)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one():
    assert torch.cuda.current_device() == 0
    tensor = torch.arange(8.0, device="cuda:1")
    array = interop.from_torch(tensor)
    assert array.devices() == {_jax_gpu(1)}
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    back = interop.to_torch(array)
    assert back.device == torch.device("cuda:1")
    out = interop.softmax(tensor.requires_grad_(), 0)
    out[0].backward()
    assert out.device == torch.device("cuda:1") and tensor.grad.device == out.device
    torch.testing.assert_close(out, torch.softmax(tensor.detach(), 0))
