"""A vocabulary split across devices: jit with a NamedSharding, and shard_map with axis_name=.

The root conftest.py gives every test process 8 simulated CPU devices (XLA reads the flag once,
before JAX starts); one test below also proves it in a fresh process. These tests run in the
CPU-kernel mode users get by default, "auto", which takes the XLA path when there are several
devices.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    ref_cross_entropy,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    to_f64,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax

try:
    shard_map = jax.shard_map
except AttributeError:  # older JAX
    from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]

ROWS, CLASSES = 4, 64
NORMALIZERS = {
    "softmax": (jsoftmax.softmax, ref_softmax, torch.softmax),
    "log_softmax": (jsoftmax.log_softmax, ref_log_softmax, torch.log_softmax),
    "logsumexp": (jsoftmax.logsumexp, ref_logsumexp, torch.logsumexp),
}
MESH_KINDS = ["auto", "explicit"]


@pytest.fixture(autouse=True)
def _kernel_auto(monkeypatch):
    # "auto": with several devices the core takes the XLA path, whose reductions XLA partitions
    # (the CPU kernels need the reduced axes whole; tests/test_cpu_kernel.py covers them).
    monkeypatch.setenv("JSOFTMAX_CPU_KERNEL", "auto")


def test_eight_devices():
    assert len(jax.devices()) == 8


def _mesh(kind: str, shape=(8,), names=("vocab",)):
    if kind == "auto":
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    mesh = jax.make_mesh(shape, names)  # the default axis types
    assert all(axis_type == AxisType.Explicit for axis_type in mesh.axis_types)
    return mesh


def _logits(seed: int = 0, edge_rows: bool = True) -> np.ndarray:
    """[4, 64] float32 logits; with edge rows, row 1 is -inf except on the last shard and row 2
    is -inf everywhere (fully masked), so some shards see nothing but -inf."""
    x = np.random.default_rng(seed).standard_normal((ROWS, CLASSES)).astype(np.float32) * 3
    if edge_rows:
        x[1, :56] = -np.inf
        x[2] = -np.inf
    return x


def _collectives(compiled_text: str) -> list[tuple[str, list[int]]]:
    """``(op, element counts of its results)`` for every cross-device op in compiled HLO."""
    found = []
    pattern = (
        r"= (\(.*?\)|\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
        r"(?:-start)?\("
    )
    for shapes, op in re.findall(pattern, compiled_text):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            for dims in re.findall(r"\w+\[([\d,]*)\]", shapes)
        ]
        found.append((op, sizes))
    return found


def _assert_only_small_all_reduces(fn, *args, max_elements=ROWS):
    found = _collectives(jax.jit(fn).lower(*args).compile().as_text())
    assert found, "expected the reductions to cross devices"
    assert {op for op, _ in found} == {"all-reduce"}, found
    assert all(size <= max_elements for _, sizes in found for size in sizes), found


def test_collective_probe_detects_an_all_gather():
    # The probe can fail: sorting along the split axis needs the whole row on one device.
    mesh = _mesh("auto")
    x = jax.device_put(_logits(edge_rows=False), NamedSharding(mesh, P(None, "vocab")))
    found = _collectives(jax.jit(lambda a: jnp.sort(a, axis=1)).lower(x).compile().as_text())
    assert {op for op, _ in found} - {"all-reduce"}, found


def _torch_grad(torch_fn, x: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
    tensor = torch.tensor(x.astype(np.float64), requires_grad=True)
    torch_fn(tensor, 1).backward(torch.tensor(cotangent.astype(np.float64)))
    return tensor.grad.numpy()


# --------------------------------------------------------------------------------------------
# jit with a NamedSharding on the class axis: XLA partitions the reductions


@pytest.mark.parametrize("kind", MESH_KINDS)
@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_jit_on_split_axis_matches_reference_with_small_all_reduces(kind, name):
    fn, reference, torch_fn = NORMALIZERS[name]
    mesh = _mesh(kind)
    sharding = NamedSharding(mesh, P(None, "vocab"))
    x = _logits()
    out = jax.jit(fn)(jax.device_put(x, sharding))
    np.testing.assert_allclose(to_f64(out), reference(x), rtol=2e-6, atol=1e-7)
    if name != "logsumexp":
        assert out.sharding.spec == P(None, "vocab")
    _assert_only_small_all_reduces(fn, jax.device_put(x, sharding))

    finite = _logits(seed=1, edge_rows=False)
    cotangent = np.random.default_rng(2).standard_normal(reference(finite).shape)

    def loss(a):
        return jnp.sum(fn(a) * cotangent)

    grad = jax.jit(jax.grad(loss))(jax.device_put(finite, sharding))
    np.testing.assert_allclose(
        to_f64(grad), _torch_grad(torch_fn, finite, cotangent), rtol=2e-5, atol=1e-6
    )
    _assert_only_small_all_reduces(jax.grad(loss), jax.device_put(finite, sharding))


@pytest.mark.parametrize("kind", MESH_KINDS)
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_jit_cross_entropy_on_split_axis(kind, targets):
    mesh = _mesh(kind)
    sharding = NamedSharding(mesh, P(None, "vocab"))
    x = _logits(seed=3, edge_rows=False)
    weight = np.random.default_rng(4).random(CLASSES).astype(np.float32) + 0.5
    if targets == "labels":
        labels = np.array([3, 63, -100, 17])
        placed_labels = jax.device_put(jnp.asarray(labels), NamedSharding(mesh, P()))
    else:
        labels = np.random.default_rng(5).dirichlet(np.ones(CLASSES), ROWS).astype(np.float32)
        placed_labels = jax.device_put(jnp.asarray(labels), sharding)
    placed_weight = jax.device_put(jnp.asarray(weight), NamedSharding(mesh, P()))

    def loss(a, y, w):
        return jsoftmax.cross_entropy(a, y, weight=w, label_smoothing=0.1)

    placed = (jax.device_put(x, sharding), placed_labels, placed_weight)
    value = jax.jit(loss)(*placed)
    reference = ref_cross_entropy(x, labels, weight=weight, label_smoothing=0.1)
    np.testing.assert_allclose(to_f64(value), reference, rtol=2e-6)
    _assert_only_small_all_reduces(loss, *placed)

    grad = jax.jit(jax.grad(loss))(*placed)
    logits = torch.tensor(x.astype(np.float64), requires_grad=True)
    target = torch.tensor(labels) if targets == "labels" else torch.tensor(labels, dtype=float)
    F.cross_entropy(
        logits, target, weight=torch.tensor(weight, dtype=float), label_smoothing=0.1
    ).backward()
    np.testing.assert_allclose(to_f64(grad), logits.grad.numpy(), rtol=2e-5, atol=1e-7)
    assert grad.sharding.spec == P(None, "vocab")
    _assert_only_small_all_reduces(jax.grad(loss), *placed)


@pytest.mark.parametrize("kind", MESH_KINDS)
@pytest.mark.parametrize(
    ("mesh_shape", "logits_spec"),
    [
        pytest.param((2, 4), P("data", "vocab"), id="rows-and-classes"),
        pytest.param((4, 2), P("data", None), id="rows-only"),
    ],
)
def test_jit_cross_entropy_with_rows_split(kind, mesh_shape, logits_spec):
    # Data parallel on one mesh axis (and vocabulary parallel on the other): the mean crosses
    # devices as a scalar, the per-row values stay on their devices.
    mesh = _mesh(kind, mesh_shape, ("data", "vocab"))
    x = _logits(seed=6, edge_rows=False)
    labels = np.array([0, 40, 63, -100])
    placed = (
        jax.device_put(x, NamedSharding(mesh, logits_spec)),
        jax.device_put(jnp.asarray(labels), NamedSharding(mesh, P("data"))),
    )
    value = jax.jit(jsoftmax.cross_entropy)(*placed)
    np.testing.assert_allclose(to_f64(value), ref_cross_entropy(x, labels), rtol=2e-6)
    _assert_only_small_all_reduces(jsoftmax.cross_entropy, *placed)
    grad = jax.jit(jax.grad(jsoftmax.cross_entropy))(*placed)
    assert grad.sharding.spec == logits_spec


# --------------------------------------------------------------------------------------------
# shard_map with axis_name=: each device holds a shard of the classes


def _place(mesh, kind: str, array, spec):
    """Explicit meshes want shard_map inputs already laid out as the in_specs say."""
    array = jnp.asarray(array)
    return jax.device_put(array, NamedSharding(mesh, spec)) if kind == "explicit" else array


@pytest.mark.parametrize("kind", MESH_KINDS)
@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_shard_map_axis_name_gives_the_global_result(kind, name):
    fn, reference, torch_fn = NORMALIZERS[name]
    mesh = _mesh(kind)
    out_spec = P() if name == "logsumexp" else P(None, "vocab")
    sharded = shard_map(
        lambda a: fn(a, axis_name="vocab"),
        mesh=mesh,
        in_specs=P(None, "vocab"),
        out_specs=out_spec,
    )
    x = _logits(seed=7)
    out = jax.jit(sharded)(_place(mesh, kind, x, P(None, "vocab")))
    np.testing.assert_allclose(to_f64(out), reference(x), rtol=2e-6, atol=1e-7)

    finite = _logits(seed=8, edge_rows=False)
    cotangent = np.random.default_rng(9).standard_normal(reference(finite).shape)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(sharded(a) * cotangent)))(
        _place(mesh, kind, finite, P(None, "vocab"))
    )
    np.testing.assert_allclose(
        to_f64(grad), _torch_grad(torch_fn, finite, cotangent), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_shard_map_axis_name_with_a_mask_and_plus_inf(name):
    fn, reference, _ = NORMALIZERS[name]
    mesh = _mesh("auto")
    x = _logits(seed=10, edge_rows=False)
    where = np.random.default_rng(11).random((ROWS, CLASSES)) < 0.7
    where[3] = False  # a fully masked row
    sharded = shard_map(
        lambda a, m: fn(a, axis_name="vocab", where=m),
        mesh=mesh,
        in_specs=(P(None, "vocab"), P(None, "vocab")),
        out_specs=P() if name == "logsumexp" else P(None, "vocab"),
    )
    out, vjp = jax.vjp(lambda a: sharded(a, jnp.asarray(where)), jnp.asarray(x))
    np.testing.assert_allclose(to_f64(out), reference(x, where=where), rtol=2e-6, atol=1e-7)
    (grad,) = vjp(jnp.ones_like(out))
    assert np.all(np.asarray(grad)[~where] == 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))

    # +inf on one shard wins the whole row, across shards.
    x[0, 42] = np.inf
    out = sharded(jnp.asarray(x), jnp.ones((ROWS, CLASSES), bool))
    if name == "softmax":
        np.testing.assert_array_equal(np.asarray(out[0]), np.eye(CLASSES)[42])
    elif name == "log_softmax":
        assert float(out[0, 42]) == 0.0 and np.all(np.delete(np.asarray(out[0]), 42) == -np.inf)
    else:
        assert float(out[0]) == np.inf


@pytest.mark.parametrize("kind", MESH_KINDS)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"label_smoothing": 0.2, "weight": True}, id="weight+smoothing"),
        pytest.param({"reduction": "none"}, id="none"),
    ],
)
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_shard_map_cross_entropy_with_global_labels(kind, options, targets):
    options = dict(options)
    mesh = _mesh(kind)
    rng = np.random.default_rng(12)
    x = _logits(seed=13, edge_rows=False)
    weight = rng.random(CLASSES).astype(np.float32) + 0.5
    use_weight = options.pop("weight", False)
    if targets == "labels":
        labels = np.array([5, 63, -100, 30])  # global class ids, on different shards
        label_spec = P()
    else:
        labels = rng.dirichlet(np.ones(CLASSES), ROWS).astype(np.float32)
        label_spec = P(None, "vocab")
    reduction = options.pop("reduction", "mean")
    sharded = shard_map(
        lambda a, y, w: jsoftmax.cross_entropy(
            a,
            y,
            weight=w if use_weight else None,
            axis_name="vocab",
            reduction=reduction,
            **options,
        ),
        mesh=mesh,
        in_specs=(P(None, "vocab"), label_spec, P()),
        out_specs=P(),
    )
    args = (
        _place(mesh, kind, x, P(None, "vocab")),
        _place(mesh, kind, labels, label_spec),
        _place(mesh, kind, weight, P()),
    )
    value = jax.jit(sharded)(*args)
    reference = ref_cross_entropy(
        x, labels, weight=weight if use_weight else None, reduction=reduction, **options
    )
    np.testing.assert_allclose(to_f64(value), reference, rtol=2e-6)

    cotangent = np.random.default_rng(14).standard_normal(reference.shape).astype(np.float32)
    grads = jax.jit(
        jax.grad(lambda a, y: jnp.sum(sharded(a, y, args[2]) * cotangent), argnums=(0, 1))
        if targets == "probabilities"
        else jax.grad(lambda a, y: jnp.sum(sharded(a, y, args[2]) * cotangent))
    )(*args[:2])
    logits = torch.tensor(x.astype(np.float64), requires_grad=True)
    if targets == "labels":
        target = torch.tensor(labels)
    else:
        target = torch.tensor(labels.astype(np.float64), requires_grad=True)
    F.cross_entropy(
        logits,
        target,
        weight=torch.tensor(weight, dtype=float) if use_weight else None,
        reduction=reduction,
        **options,
    ).backward(torch.tensor(cotangent, dtype=float))
    logits_grad = grads[0] if targets == "probabilities" else grads
    np.testing.assert_allclose(to_f64(logits_grad), logits.grad.numpy(), rtol=2e-5, atol=1e-7)
    if targets == "probabilities":
        np.testing.assert_allclose(to_f64(grads[1]), target.grad.numpy(), rtol=2e-5, atol=1e-6)


def test_shard_map_cross_entropy_over_a_tuple_of_axes_and_split_rows():
    # Classes split over two mesh axes at once; then rows on one axis, classes on the other.
    mesh = _mesh("auto", (2, 4), ("a", "b"))
    x = _logits(seed=15, edge_rows=False)
    labels = np.array([1, 62, 33, -100])
    over_both = shard_map(
        lambda a, y: jsoftmax.cross_entropy(a, y, axis_name=("a", "b"), reduction="none"),
        mesh=mesh,
        in_specs=(P(None, ("a", "b")), P()),
        out_specs=P(),
    )
    reference = ref_cross_entropy(x, labels, reduction="none")
    np.testing.assert_allclose(to_f64(over_both(x, labels)), reference, rtol=2e-6)
    rows_and_classes = shard_map(
        lambda a, y: jsoftmax.cross_entropy(a, y, axis_name="b", reduction="none"),
        mesh=mesh,
        in_specs=(P("a", "b"), P("a")),
        out_specs=P("a"),
    )
    np.testing.assert_allclose(to_f64(rows_and_classes(x, labels)), reference, rtol=2e-6)


@pytest.mark.parametrize("name", [*sorted(NORMALIZERS), "cross_entropy"])
def test_axis_name_outside_shard_map_is_a_clear_error(name):
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=f"{name}: axis_name expected a mesh axis bound by"):
        if name == "cross_entropy":
            jsoftmax.cross_entropy(x, jnp.zeros(2, jnp.int32), axis_name="vocab")
        else:
            NORMALIZERS[name][0](x, axis_name="vocab")


def test_fresh_process_with_the_flag():
    # XLA reads the device count once: set it first thing in a new interpreter.
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        import jsoftmax
        mesh = jax.make_mesh((8,), ("vocab",))
        x = jax.device_put(jnp.zeros((2, 16)), NamedSharding(mesh, P(None, "vocab")))
        print(len(jax.devices()), float(jax.jit(jsoftmax.cross_entropy)(x, jnp.array([3, 12]))))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    devices, loss = result.stdout.split()
    assert devices == "8"
    np.testing.assert_allclose(float(loss), np.log(16.0), rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_shard_map_cross_entropy_rows_with_infinite_maxima_match_one_device(smoothing):
    # A batch holding a row that +inf wins (on one shard only) and a fully -inf row makes the CPU
    # take the exact row statistics (a lax.cond whose branch holds the per-row all-reduces): the
    # sharded loss and gradient equal the unsharded ones, the edge rows included.
    mesh = _mesh("auto")
    x = _logits(seed=17)  # row 1: -inf but on the last shard; row 2: -inf everywhere
    x[0, 42] = np.inf
    labels = np.array([42, 60, -100, 7])

    def loss(a, y, **kwargs):
        return jsoftmax.cross_entropy(a, y, label_smoothing=smoothing, reduction="none", **kwargs)

    sharded = shard_map(
        lambda a, y: loss(a, y, axis_name="vocab"),
        mesh=mesh,
        in_specs=(P(None, "vocab"), P()),
        out_specs=P(),
    )
    expected = jax.jit(loss)(x, labels)
    np.testing.assert_allclose(to_f64(sharded(x, labels)), to_f64(expected), rtol=2e-6)
    # Row 0: the label is the one +inf logit (loss 0), smoothing puts mass next to it (+inf); row
    # 1: finite, or +inf with smoothing mass on its -inf classes; row 2 is ignored.
    edge = [0.0, None, 0.0] if smoothing == 0 else [np.inf, np.inf, 0.0]
    for row, value in enumerate(edge):
        got = float(expected[row])
        assert np.isfinite(got) if value is None else got == value, (row, got)

    def total(f):
        return jax.grad(lambda a: jnp.sum(jnp.where(jnp.isfinite(f(a, labels)), f(a, labels), 0)))

    np.testing.assert_allclose(
        to_f64(jax.jit(total(sharded))(x)), to_f64(jax.jit(total(loss))(x)), rtol=2e-6, atol=1e-7
    )
