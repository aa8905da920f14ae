"""Zero-copy conversion between torch tensors and JAX arrays through DLPack.

Raw DLPack between torch and JAX gets several cases wrong or refuses them; the bridges here
resolve each one before the hand-off, so values are always right and memory is shared whenever
JAX can alias it:

* requires_grad is detached (a view); the conjugate and negative bits are resolved (a copy), so
  ``tensor.conj().imag`` keeps its sign.
* Layouts JAX cannot alias (step and column slices, stride 0, 64-byte misalignment on CPU) are
  copied once by torch into a dense tensor; permutations (transposes, channels-last) are aliased
  with a non-default JAX layout; size-1 dims with odd strides are given canonical ones (a view).
* 64-bit types with JAX's x64 off: integers are narrowed to 32 bits only after checking that
  every value fits; float64 and complex128 raise, since rounding would change the values.
* On CUDA the hand-off is ordered on streams through the DLPack ``stream`` argument (the producer
  records an event that the consumer's stream waits on), never by synchronising the device.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

# Dtypes both libraries have and DLPack carries (float8 variants included).
_SHARED_DTYPE_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)


def _shared_dtypes() -> dict[torch.dtype, np.dtype]:
    """torch dtype -> numpy/JAX dtype for every name both installed versions define."""
    table: dict[torch.dtype, np.dtype] = {}
    for name in _SHARED_DTYPE_NAMES:
        torch_dtype = getattr(torch, name, None)
        jax_type = getattr(jnp, "bool_" if name == "bool" else name, None)
        if isinstance(torch_dtype, torch.dtype) and jax_type is not None:
            table[torch_dtype] = np.dtype(jax_type)
    return table


TORCH_TO_JAX_DTYPE: dict[torch.dtype, np.dtype] = _shared_dtypes()
JAX_TO_TORCH_DTYPE: dict[np.dtype, torch.dtype] = {v: k for k, v in TORCH_TO_JAX_DTYPE.items()}

# With x64 off JAX holds none of these; integers narrow exactly when their values fit.
_NARROWED_INTEGERS = {torch.int64: torch.int32, torch.uint64: torch.uint32}
_WIDE_FLOATS = {torch.float64: "float32", torch.complex128: "complex64"}

_TRACER_TYPES: tuple[type, ...] = (jax.core.Tracer,) if hasattr(jax.core, "Tracer") else ()


def x64_enabled() -> bool:
    """Whether JAX holds 64-bit types in the current (thread-local) configuration."""
    return jax.dtypes.canonicalize_dtype(np.int64) == np.dtype(np.int64)


_NO_SCOPE = contextlib.nullcontext()


def x64_scope(*dtypes: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """A context turning JAX's x64 on when any of ``dtypes`` is 64-bit, so its values survive.

    The setting is thread-local, so this is safe in torch's autograd threads too.
    """
    if any(dtype in _NARROWED_INTEGERS or dtype in _WIDE_FLOATS for dtype in dtypes):
        return jax.enable_x64(True)
    return _NO_SCOPE


def check_copy(copy: Any, fname: str) -> None:
    if copy is not None and not isinstance(copy, bool):
        raise TypeError(f"{fname}: copy expected None, True or False, got {copy!r}")


@functools.cache
def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def check_tensor(tensor: Any, fname: str, argname: str = "tensor") -> None:
    """Raises TypeError unless ``tensor`` is a dense CPU/CUDA tensor of a dtype JAX has."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fname}: {argname} expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_nested:
        layout = "nested" if tensor.is_nested else str(tensor.layout)
        raise TypeError(
            f"{fname}: {argname} expected a dense (strided) tensor, got layout {layout}; "
            "convert it with tensor.to_dense() first"
        )
    if tensor.is_quantized:
        raise TypeError(f"{fname}: {argname} expected a non-quantized tensor, got {tensor.dtype}")
    if tensor.dtype not in TORCH_TO_JAX_DTYPE:
        raise TypeError(
            f"{fname}: {argname} expected a dtype JAX supports, got {tensor.dtype} "
            "(JAX has no equivalent)"
        )
    device_type = tensor.device.type
    if device_type not in ("cpu", "cuda"):
        raise TypeError(
            f"{fname}: {argname} expected a CPU or CUDA tensor, got device {tensor.device}"
        )
    if device_type == "cuda" and not _jax_has_gpu():
        raise TypeError(
            f"{fname}: {argname} expected a CPU tensor (this JAX has no GPU backend), "
            f"got device {tensor.device}"
        )


def _is_aliasable_layout(tensor: torch.Tensor) -> bool:
    """Whether JAX can alias ``tensor``'s strides: a permutation of a dense layout.

    Size-1 dims are ignored (their stride never addresses memory); stride 0 (expand), gaps (step
    and column slices) and overlaps are not aliasable.
    """
    if tensor.numel() == 0:
        return True
    dims = zip(tensor.shape, tensor.stride(), strict=True)
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in dims if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _canonical_strides(shape: torch.Size) -> tuple[int, ...]:
    strides = []
    running = 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def _dense_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A row-major copy: torch allocations are 64-byte aligned, and row-major gives JAX its
    # default layout (no extra compilation downstream).
    return tensor.clone(memory_format=torch.contiguous_format)


def _narrow_integers(tensor: torch.Tensor, fname: str, argname: str) -> torch.Tensor:
    """int64/uint64 -> int32/uint32, after checking every value fits (one device read)."""
    narrow = _NARROWED_INTEGERS[tensor.dtype]
    info = torch.iinfo(narrow)
    if tensor.numel():
        # uint64 has no min/max kernels in torch; its int64 reinterpretation does, and any value
        # at or above 2**63 shows up as negative there and fails the check as it should.
        as_signed = tensor.view(torch.int64) if tensor.dtype == torch.uint64 else tensor
        low, high = torch.stack(torch.aminmax(as_signed)).tolist()
        if low < info.min or high > info.max:
            raise ValueError(
                f"{fname}: {argname} expected {tensor.dtype} values within {narrow}'s range "
                f"[{info.min}, {info.max}] when jax_enable_x64 is off, got values in "
                f"[{low}, {high}]; enable x64 (jax.config.update('jax_enable_x64', True) or "
                "`with jax.enable_x64(True):`) to keep 64 bits"
            )
    return tensor.to(narrow)


def _private_cpu_import() -> Any:
    """jaxlib's DLPack importer, when its signature is the one known here; else None.

    ``jax.dlpack.from_dlpack`` spends most of its ~35 us per call in Python around this one
    call (device lookup, a no-op ``jnp.asarray``); calling it directly costs ~8 us. It is
    private, so it is used only for aligned CPU tensors, only from the jaxlib extension version
    that introduced its current signature, and each result is checked (pointer, shape, dtype)
    before it is trusted; any surprise turns it off for good and the public path takes over.
    """
    try:
        from jax._src.lib import _jax as jaxlib_extension
        from jax._src.lib import jaxlib_extension_version
    except ImportError:
        return None
    if jaxlib_extension_version < 467:
        return None
    return getattr(jaxlib_extension, "dlpack_managed_tensor_to_buffer", None)


_fast_cpu_import = _private_cpu_import()
_DL_DEVICE_CPU = 1  # DLPack's kDLCPU
_CPU_ALIGNMENT = 64  # bytes; JAX on CPU copies (or refuses) anything less aligned


@functools.cache
def _jax_cpu_device() -> Any:
    return jax.devices("cpu")[0]


def _try_fast_cpu_import(tensor: torch.Tensor) -> jax.Array | None:
    global _fast_cpu_import
    assert _fast_cpu_import is not None
    try:
        capsule = tensor.__dlpack__()
        array = _fast_cpu_import(capsule, _jax_cpu_device(), None, False, _DL_DEVICE_CPU)
    except jax.errors.JaxRuntimeError:  # refused (stricter alignment?): the public path decides
        return None
    except (TypeError, AttributeError):  # the private signature changed
        _fast_cpu_import = None
        return None
    if (
        isinstance(array, jax.Array)
        and array.shape == tuple(tensor.shape)
        and array.dtype == TORCH_TO_JAX_DTYPE[tensor.dtype]
        and (tensor.numel() == 0 or array.unsafe_buffer_pointer() == tensor.data_ptr())
    ):
        return array
    _fast_cpu_import = None
    return None


def _dlpack_import(tensor: torch.Tensor) -> jax.Array:
    """jax.dlpack.from_dlpack without copies; ValueError when JAX would need one (alignment)."""
    if (
        _fast_cpu_import is not None
        and tensor.device.type == "cpu"
        and tensor.data_ptr() % _CPU_ALIGNMENT == 0
    ):
        array = _try_fast_cpu_import(tensor)
        if array is not None:
            return array
    if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
        # torch exports only from the current device, and orders the hand-off on its stream.
        with torch.cuda.device(tensor.device):
            return jax.dlpack.from_dlpack(tensor, copy=False)
    return jax.dlpack.from_dlpack(tensor, copy=False)


def import_tensor(
    tensor: torch.Tensor, copy: bool | None, fname: str, argname: str = "tensor"
) -> jax.Array:
    """from_torch's body, for a tensor that passed :func:`check_tensor`."""
    view = tensor.detach() if tensor.requires_grad else tensor
    fresh = False  # whether ``view`` is already memory nobody else holds
    if view.is_conj() or view.is_neg():
        if copy is False:
            raise ValueError(
                f"{fname}: copy=False but {argname} has the "
                f"{'conjugate' if view.is_conj() else 'negative'} bit set, which JAX cannot "
                "represent lazily; a copy is needed (use copy=None or True)"
            )
        view = view.resolve_conj().resolve_neg()
        fresh = True
    wide = view.dtype in _WIDE_FLOATS or view.dtype in _NARROWED_INTEGERS
    if wide and not x64_enabled():
        if view.dtype in _WIDE_FLOATS:
            raise TypeError(
                f"{fname}: {argname} expected a dtype JAX holds with jax_enable_x64 off, got "
                f"{view.dtype} (rounding to {_WIDE_FLOATS[view.dtype]} would change values); "
                "enable x64 (jax.config.update('jax_enable_x64', True) or "
                f"`with jax.enable_x64(True):`) or convert the tensor first"
            )
        if view.dtype in _NARROWED_INTEGERS:
            if copy is False:
                raise ValueError(
                    f"{fname}: copy=False but {argname} is {view.dtype} and jax_enable_x64 is "
                    "off, so it must be narrowed to 32 bits (a copy); enable x64 or use copy=None"
                )
            view = _narrow_integers(view, fname, argname)
            fresh = True
    if not fresh:
        contiguous = view.is_contiguous()
        if not (contiguous or _is_aliasable_layout(view)):
            if copy is False:
                raise ValueError(
                    f"{fname}: copy=False but {argname}'s layout (shape {tuple(view.shape)}, "
                    f"strides {view.stride()}) cannot be aliased by JAX (stride 0, or gaps from a "
                    "step or column slice); a copy is needed (use copy=None or True)"
                )
            view = _dense_copy(view)
        elif copy:
            view = _dense_copy(view)
        elif contiguous and 1 in view.shape and view.stride() != _canonical_strides(view.shape):
            # Odd strides on size-1 dims would give JAX a non-default layout for nothing.
            view = view.as_strided(view.shape, _canonical_strides(view.shape))
    try:
        return _dlpack_import(view)
    except ValueError as err:
        # JAX on CPU aliases only 64-byte-aligned memory; a storage offset can break that.
        if copy is False:
            raise ValueError(
                f"{fname}: copy=False but {argname}'s memory is not aligned as JAX requires "
                f"(data_ptr {view.data_ptr():#x}, storage offset {view.storage_offset()}); a "
                "copy is needed (use copy=None or True)"
            ) from err
        return _dlpack_import(_dense_copy(view))


def from_torch(tensor: torch.Tensor, *, copy: bool | None = None) -> jax.Array:
    """A torch tensor as a JAX array, sharing its memory whenever JAX can alias it.

    Args:
      tensor: a dense CPU or CUDA tensor of any dtype JAX also has (bool, signed and unsigned
        integers, float16/bfloat16/float32/float64, complex64/128, the float8 formats). A tensor
        that requires grad is detached.
      copy: None (default) copies only when JAX cannot alias the memory; True always copies
        (the result never shares memory with ``tensor``); False never copies and raises
        ValueError when a copy would be needed.

    Returns:
      A jax.Array with ``tensor``'s shape, values and (64-bit aside) dtype, on the matching JAX
      device.

    Raises:
      TypeError: ``tensor`` is not a tensor, is sparse, nested or quantized, lives on a device
        JAX cannot reach, has a dtype JAX lacks (torch.complex32, ...), or is float64/complex128
        while ``jax_enable_x64`` is off.
      ValueError: ``copy=False`` but a copy is needed; or int64/uint64 values do not fit in 32
        bits while ``jax_enable_x64`` is off.

    Note:
      Zero-copy results alias ``tensor``: a torch in-place op on ``tensor`` then changes an array
      that JAX assumes immutable (and ``tensor.resize_()`` can free memory JAX still reads). Use
      ``copy=True`` when ``tensor`` may be modified later. Copies happen for stride-0, step or
      column slices, 64-byte misaligned storage offsets (JAX on CPU), the conjugate or negative
      bit, and 64-bit integers narrowed with x64 off. On CUDA the hand-off is ordered on streams.

    Example:
      >>> import torch
      >>> from jsoftmax.interop import from_torch
      >>> tensor = torch.arange(6.0).reshape(2, 3)
      >>> array = from_torch(tensor)
      >>> print(array.dtype, array.shape, array.unsafe_buffer_pointer() == tensor.data_ptr())
      float32 (2, 3) True
      >>> print(from_torch(torch.tensor([1 + 2j]).conj().imag))
      [-2.]
    """
    check_tensor(tensor, "from_torch")
    check_copy(copy, "from_torch")
    return import_tensor(tensor, copy, "from_torch")


def _check_exportable(array: Any, fname: str, *, allow_sharded: bool = False) -> None:
    if isinstance(array, _TRACER_TYPES):
        raise TypeError(
            f"{fname}: array expected a concrete jax.Array, got a tracer ({type(array).__name__}):"
            " inside jax.jit, vmap or grad the values do not exist yet; convert outside the "
            "transformation (or call torch through jax.pure_callback)"
        )
    if not isinstance(array, jax.Array):
        raise TypeError(f"{fname}: array expected a jax.Array, got {type(array).__name__}")
    try:
        deleted = array.is_deleted()
    except jax.errors.ConcretizationTypeError as err:  # a tracer type not caught above
        raise TypeError(
            f"{fname}: array expected a concrete jax.Array, got a tracer: convert outside the "
            "transformation"
        ) from err
    if deleted:
        raise ValueError(
            f"{fname}: array expected a live jax.Array, got one whose buffer was deleted "
            "(donated to a jitted function or .delete()d)"
        )
    if not allow_sharded and len(array.sharding.device_set) > 1:
        raise ValueError(
            f"{fname}: array expected an array on one device, got one placed on "
            f"{len(array.sharding.device_set)} devices ({type(array.sharding).__name__}); "
            "convert its shards one by one with jsoftmax.interop.to_torch_shards"
        )
    dtype = array.dtype
    if not isinstance(dtype, np.dtype) or dtype not in JAX_TO_TORCH_DTYPE:
        hint = "; use jax.random.key_data" if jnp.issubdtype(dtype, jax.dtypes.prng_key) else ""
        raise TypeError(
            f"{fname}: array expected a dtype torch supports, got {dtype} "
            f"(torch has no equivalent){hint}"
        )


def export_array(array: jax.Array, copy: bool | None) -> torch.Tensor:
    """to_torch's body, for an array that passed the checks."""
    # torch.from_dlpack passes torch's current stream (CUDA), and JAX makes it wait on the
    # array's ready event, so no device-wide synchronisation happens.
    tensor = torch.from_dlpack(array)
    return tensor.clone() if copy else tensor


def to_torch(array: jax.Array, *, copy: bool | None = None) -> torch.Tensor:
    """A JAX array as a torch tensor, sharing its memory.

    Args:
      array: a concrete jax.Array on one CPU or GPU device, of a dtype torch also has.
      copy: None (default) and False share memory (a single-device array never needs a copy);
        True returns a tensor with its own memory.

    Returns:
      A torch.Tensor with ``array``'s shape, dtype and values on the matching torch device.

    Raises:
      TypeError: ``array`` is not a jax.Array, is a tracer (inside jit, vmap or grad), or has a
        dtype torch lacks (int4, PRNG keys, ...).
      ValueError: ``array`` was deleted or donated, or is placed on several devices (use
        :func:`to_torch_shards`).

    Note:
      The zero-copy tensor aliases an array JAX assumes immutable: an in-place torch op on it
      (``add_``, ``copy_``, an optimizer step, ...) silently changes the JAX array too. Use
      ``copy=True`` when the tensor will be modified in place.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsoftmax.interop import to_torch
      >>> array = jnp.arange(4, dtype=jnp.float32)
      >>> tensor = to_torch(array)
      >>> print(tensor, tensor.data_ptr() == array.unsafe_buffer_pointer())
      tensor([0., 1., 2., 3.]) True
    """
    _check_exportable(array, "to_torch")
    check_copy(copy, "to_torch")
    return export_array(array, copy)


def to_torch_shards(
    array: jax.Array, *, copy: bool | None = None
) -> list[tuple[tuple[slice, ...], torch.Tensor]]:
    """Each addressable shard of ``array`` as ``(index, tensor)``, sharing memory.

    Args:
      array: a concrete jax.Array, sharded or not.
      copy: as in :func:`to_torch`.

    Returns:
      One ``(index, tensor)`` pair per addressable shard, in ``array.addressable_shards`` order:
      ``index`` is the shard's position in ``array`` (a tuple of slices) and ``tensor`` lives on
      the shard's device. A replicated array gives one full copy per device.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsoftmax.interop import to_torch_shards
      >>> [(index, tensor)] = to_torch_shards(jnp.ones(3))
      >>> print(index, tensor)
      (slice(None, None, None),) tensor([1., 1., 1.])
    """
    _check_exportable(array, "to_torch_shards", allow_sharded=True)
    check_copy(copy, "to_torch_shards")
    return [(shard.index, export_array(shard.data, copy)) for shard in array.addressable_shards]
