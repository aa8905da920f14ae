"""The DLPack bridges: from_torch / to_torch dtypes, layouts, copy semantics, aliasing, errors."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import enable_x64, raw_bytes, torch_dtype_sample

from jsoftmax import interop
from jsoftmax.interop import _convert

# Every dtype the two libraries share; the 64-bit ones run with JAX's x64 on.
SHARED_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
]  # fmt: skip
WIDE = {"int64", "uint64", "float64", "complex128"}


def _aliases(array: jax.Array, tensor: torch.Tensor) -> bool:
    return array.unsafe_buffer_pointer() == tensor.data_ptr()


def _x64(name: str):
    return enable_x64() if name in WIDE else jax.enable_x64(False)


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("name", SHARED_DTYPES)
def test_from_torch_every_shared_dtype_zero_copy(name):
    tensor = torch_dtype_sample(name)
    with _x64(name):
        array = interop.from_torch(tensor, copy=False)
        assert array.dtype == np.dtype(jnp.dtype(name))
        assert _aliases(array, tensor)
        assert raw_bytes(array) == raw_bytes(tensor)


@pytest.mark.parametrize("name", SHARED_DTYPES)
def test_to_torch_every_shared_dtype_zero_copy(name):
    source = torch_dtype_sample(name)
    with _x64(name):
        array = interop.from_torch(source, copy=True)
        tensor = interop.to_torch(array, copy=False)
        assert tensor.dtype == getattr(torch, name)
        assert tensor.data_ptr() == array.unsafe_buffer_pointer()
        assert raw_bytes(tensor) == raw_bytes(source)


@pytest.mark.parametrize("name", ["float8_e8m0fnu"])
def test_newer_float8_formats_when_both_sides_have_them(name):
    if not (hasattr(torch, name) and hasattr(jnp, name)):
        pytest.skip(f"{name} is missing from this torch or JAX")
    tensor = torch_dtype_sample(name)
    array = interop.from_torch(tensor)
    assert _aliases(array, tensor) and raw_bytes(array) == raw_bytes(tensor)
    assert raw_bytes(interop.to_torch(array)) == raw_bytes(tensor)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_from_torch_rejects_dtypes_jax_lacks():
    with pytest.raises(TypeError, match=r"from_torch: tensor expected a dtype JAX .*complex32"):
        interop.from_torch(torch.zeros(2, dtype=torch.complex32))
    quantized = torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match=r"from_torch: tensor expected a non-quantized"):
        interop.from_torch(quantized)


def test_to_torch_rejects_dtypes_torch_lacks():
    with pytest.raises(TypeError, match=r"to_torch: array expected a dtype torch .*int4"):
        interop.to_torch(jnp.zeros(4, jnp.int4))
    with pytest.raises(TypeError, match=r"key<fry>.*key_data"):
        interop.to_torch(jax.random.key(0))


# --------------------------------------------------------------------------------------------
# 64-bit types with x64 off: exact narrowing of integers, an error for floats


@pytest.mark.parametrize("name", ["int64", "uint64"])
def test_x64_off_narrows_integers_that_fit(name):
    values = [0, 7, 2**31 - 1] if name == "int64" else [0, 7, 2**32 - 1]
    tensor = torch.tensor(values, dtype=torch.int64).to(getattr(torch, name))
    with jax.enable_x64(False):
        array = interop.from_torch(tensor)
        assert array.dtype == (jnp.int32 if name == "int64" else jnp.uint32)
        np.testing.assert_array_equal(np.asarray(array, np.int64), values)
        with pytest.raises(ValueError, match=r"copy=False but tensor is torch.*64.*narrowed"):
            interop.from_torch(tensor, copy=False)


@pytest.mark.parametrize(
    ("name", "value"), [("int64", 2**31), ("int64", -(2**31) - 1), ("uint64", 2**32)]
)
def test_x64_off_refuses_integers_that_do_not_fit(name, value):
    tensor = torch.tensor([0, value], dtype=torch.int64).to(getattr(torch, name))
    with jax.enable_x64(False), pytest.raises(ValueError, match=r"within torch.*int32.*range"):
        interop.from_torch(tensor)


def test_x64_off_refuses_uint64_above_int64_range():
    # 2**63 + 5 read as int64 is negative: the check must still see it as too large.
    tensor = torch.tensor([2**63 + 5], dtype=torch.uint64)
    with jax.enable_x64(False), pytest.raises(ValueError, match="uint32's range"):
        interop.from_torch(tensor)


@pytest.mark.parametrize("name", ["float64", "complex128"])
def test_x64_off_refuses_wide_floats(name):
    tensor = torch.ones(3, dtype=getattr(torch, name))
    with jax.enable_x64(False), pytest.raises(TypeError, match=f"got torch.{name}.*enable x64"):
        interop.from_torch(tensor)


# --------------------------------------------------------------------------------------------
# layouts: values always right, zero-copy wherever JAX can alias


def _base(*shape: int) -> torch.Tensor:
    return torch.arange(float(np.prod(shape))).reshape(shape)


LAYOUTS = {
    # name: (builder, whether JAX can alias it)
    "contiguous": (lambda: _base(3, 4), True),
    "transposed": (lambda: _base(3, 4).t(), True),
    "permuted": (lambda: _base(2, 3, 4).permute(2, 0, 1), True),
    "channels_last": (lambda: _base(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
    "step_slice": (lambda: _base(4, 6)[::2], False),
    "column_slice": (lambda: _base(4, 6)[:, 1:3], False),
    "expand": (lambda: _base(1, 4).expand(3, 4), False),
    "misaligned_offset": (lambda: _base(40)[1:], False),
    "aligned_offset": (lambda: _base(40)[16:], True),  # 16 float32 = 64 bytes
    "size1_odd_strides": (lambda: _base(4).as_strided((4, 1, 1), (1, 7, 9)), True),
    "size1_odd_strides_permuted": (lambda: _base(12).as_strided((4, 1, 3), (1, 5, 4)), True),
    "zero_d": (lambda: torch.tensor(2.5), True),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_from_torch_layouts(name):
    build, aliasable = LAYOUTS[name]
    tensor = build()
    array = interop.from_torch(tensor)
    np.testing.assert_array_equal(np.asarray(array), tensor.numpy())
    assert array.shape == tuple(tensor.shape)
    assert _aliases(array, tensor) == aliasable
    if aliasable:
        assert _aliases(interop.from_torch(tensor, copy=False), tensor)
    else:
        with pytest.raises(ValueError, match="from_torch: copy=False but tensor"):
            interop.from_torch(tensor, copy=False)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_from_torch_copy_true_is_independent(name):
    tensor = LAYOUTS[name][0]()
    expected = tensor.numpy().copy()
    array = interop.from_torch(tensor, copy=True)
    assert not _aliases(array, tensor)
    # Write through the whole storage (an expanded tensor cannot be written in place).
    torch.empty(0, dtype=tensor.dtype).set_(tensor.untyped_storage()).fill_(-1)
    np.testing.assert_array_equal(np.asarray(array), expected)


def test_canonical_strides_give_jax_its_default_layout():
    # (4, 1) with strides (1, 3) is contiguous for torch; as is, JAX would infer a transposed
    # layout and compile every function twice. The bridge hands JAX canonical strides.
    tensor = _base(4).as_strided((4, 1), (1, 3))
    assert jax.dlpack.from_dlpack(tensor).format.layout.major_to_minor == (1, 0)
    array = interop.from_torch(tensor)
    assert array.format.layout.major_to_minor == (0, 1)
    assert _aliases(array, tensor)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2)])
def test_zero_size(shape):
    tensor = torch.zeros(shape)
    array = interop.from_torch(tensor, copy=False)
    assert array.shape == shape and array.dtype == jnp.float32
    back = interop.to_torch(jnp.zeros(shape))
    assert tuple(back.shape) == shape


def test_transposed_array_back_to_torch_keeps_memory_and_strides():
    tensor = _base(3, 4).t()
    back = interop.to_torch(interop.from_torch(tensor))
    assert back.data_ptr() == tensor.data_ptr()
    assert back.stride() == tensor.stride()
    assert torch.equal(back, tensor)


# --------------------------------------------------------------------------------------------
# torch's tensor flags


def test_requires_grad_is_detached_without_copy():
    tensor = torch.ones(4, requires_grad=True)
    array = interop.from_torch(tensor)
    assert _aliases(array, tensor) and tensor.requires_grad


def test_conjugate_bit_is_resolved():
    tensor = torch.tensor([1 + 2j, 3 - 4j])
    np.testing.assert_array_equal(np.asarray(interop.from_torch(tensor.conj())), [1 - 2j, 3 + 4j])
    with pytest.raises(ValueError, match="conjugate bit"):
        interop.from_torch(tensor.conj(), copy=False)


def test_negative_bit_is_resolved():
    # torch.tensor([1 + 2j]).conj().imag is a view with the negative bit: -2, not 2.
    imag = torch.tensor([1 + 2j, 3 - 4j]).conj().imag
    assert imag.is_neg()
    np.testing.assert_array_equal(np.asarray(interop.from_torch(imag)), [-2.0, 4.0])
    with pytest.raises(ValueError, match="negative bit"):
        interop.from_torch(imag, copy=False)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_tensors_are_rejected(layout):
    sparse = torch.eye(3).to_sparse() if layout == "sparse_coo" else torch.eye(3).to_sparse_csr()
    with pytest.raises(TypeError, match=f"from_torch: tensor expected a dense.*{layout}"):
        interop.from_torch(sparse)


def test_meta_device_is_rejected():
    with pytest.raises(TypeError, match="from_torch: tensor expected a CPU or CUDA tensor, got"):
        interop.from_torch(torch.empty(3, device="meta"))


# --------------------------------------------------------------------------------------------
# aliasing and lifetime


def test_zero_copy_aliasing_is_real_and_copy_true_protects():
    # The documented hazard: torch writes through to a JAX array that JAX assumes immutable.
    tensor = torch.zeros(4)
    shared, private = interop.from_torch(tensor), interop.from_torch(tensor, copy=True)
    tensor.add_(1)
    np.testing.assert_array_equal(np.asarray(shared), np.ones(4))
    np.testing.assert_array_equal(np.asarray(private), np.zeros(4))

    array = jnp.zeros(4)
    shared_tensor, private_tensor = interop.to_torch(array), interop.to_torch(array, copy=True)
    assert private_tensor.data_ptr() != array.unsafe_buffer_pointer()
    shared_tensor.add_(1)
    np.testing.assert_array_equal(np.asarray(array), np.ones(4))
    assert torch.equal(private_tensor, torch.zeros(4))


def test_results_outlive_their_sources():
    tensor = torch.arange(1000.0)
    array = interop.from_torch(tensor)
    del tensor
    gc.collect()
    np.testing.assert_array_equal(np.asarray(array), np.arange(1000.0))

    source = jnp.arange(1000.0)
    back = interop.to_torch(source)
    del source
    gc.collect()
    assert torch.equal(back, torch.arange(1000.0))


def test_to_torch_waits_for_pending_jax_work():
    # JAX dispatches asynchronously; the tensor must see the finished values.
    big = jnp.ones((1024, 1024))
    result = (big @ big)[:, 0] + jnp.arange(1024.0)
    np.testing.assert_array_equal(interop.to_torch(result).numpy(), 1024.0 + np.arange(1024.0))


# --------------------------------------------------------------------------------------------
# the CPU import's fast path (a private jaxlib call) is checked and falls back


def test_public_import_path_gives_the_same_results(monkeypatch):
    monkeypatch.setattr(_convert, "_fast_cpu_import", None)
    for name in ("contiguous", "transposed", "misaligned_offset"):
        build, aliasable = LAYOUTS[name]
        tensor = build()
        array = interop.from_torch(tensor)
        np.testing.assert_array_equal(np.asarray(array), tensor.numpy())
        assert _aliases(array, tensor) == aliasable
    with pytest.raises(ValueError, match="not aligned"):
        interop.from_torch(LAYOUTS["misaligned_offset"][0](), copy=False)


def test_fast_path_results_are_checked(monkeypatch):
    # A private call that misbehaves (here: returns other memory) is caught and switched off.
    monkeypatch.setattr(_convert, "_fast_cpu_import", lambda *args: jnp.zeros(3))
    tensor = torch.arange(3.0)
    array = interop.from_torch(tensor)
    assert _aliases(array, tensor)
    np.testing.assert_array_equal(np.asarray(array), [0.0, 1.0, 2.0])
    assert _convert._fast_cpu_import is None


# --------------------------------------------------------------------------------------------
# errors on the JAX side and per-shard conversion


def test_to_torch_of_a_tracer_explains():
    @jax.jit
    def convert(x):
        interop.to_torch(x)
        return x

    with pytest.raises(TypeError, match=r"to_torch: array expected a concrete jax.Array.*tracer"):
        convert(jnp.ones(2))


def test_to_torch_of_a_deleted_array_explains():
    array = jnp.ones(3)
    array.delete()
    with pytest.raises(ValueError, match=r"to_torch: array expected a live jax.Array.*deleted"):
        interop.to_torch(array)


@pytest.mark.multidevice
def test_sharded_arrays_explain_and_convert_per_shard():
    devices = jax.devices("cpu")
    if len(devices) < 2:
        pytest.skip("needs several (simulated) CPU devices")
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("rows",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    array = jax.device_put(jnp.arange(12.0).reshape(4, 3), sharding)
    with pytest.raises(ValueError, match=r"placed on 2 devices.*to_torch_shards"):
        interop.to_torch(array)
    shards = interop.to_torch_shards(array)
    assert len(shards) == 2
    for (index, tensor), shard in zip(shards, array.addressable_shards, strict=True):
        assert tensor.data_ptr() == shard.data.unsafe_buffer_pointer()
        np.testing.assert_array_equal(tensor.numpy(), np.arange(12.0).reshape(4, 3)[index])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: interop.from_torch(np.ones(3)), "from_torch: tensor expected a torch.Tensor"),
        (lambda: interop.from_torch([1.0]), "from_torch: tensor expected a torch.Tensor, got list"),
        (lambda: interop.to_torch(np.ones(3)), "to_torch: array expected a jax.Array, got ndarray"),
        (lambda: interop.to_torch(torch.ones(3)), "to_torch: array expected a jax.Array"),
        (lambda: interop.from_torch(torch.ones(3), copy="yes"), "from_torch: copy expected None"),
        (lambda: interop.to_torch(jnp.ones(3), copy=1), "to_torch: copy expected None"),
    ],
)
def test_wrong_kinds_raise_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()
