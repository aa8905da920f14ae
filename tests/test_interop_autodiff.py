"""Every torch autodiff mode through the torch-facing functions: forward AD, torch.func, Hessians.

Each result is compared with torch's own function under the same transformation, in float64
(tolerance table), on logits where jsoftmax and torch agree (finite rows).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _helpers import tolerance

from jsoftmax import interop

GRAD_TOL = tolerance("float64", grad=True)


def _softmax_pair(name):
    ours = interop.softmax if name == "softmax" else interop.log_softmax
    theirs = torch.softmax if name == "softmax" else torch.log_softmax
    return ours, theirs


def _rand(shape, seed, dtype=torch.float64):
    values = np.random.default_rng(seed).standard_normal(shape) * 2.0
    return torch.tensor(values, dtype=dtype)


def _labels(rows, classes, seed=3):
    labels = torch.tensor(np.random.default_rng(seed).integers(0, classes, rows))
    labels[0] = -100  # one ignored row
    return labels


def _probabilities(shape, seed=4):
    return torch.softmax(_rand(shape, seed), dim=1)


# Each case: (our function, torch's function, the inputs), every input differentiable.
def _cases():
    cases = {}
    for name in ("softmax", "log_softmax"):
        ours, theirs = _softmax_pair(name)
        for dim in (0, 1):
            cases[f"{name}-dim{dim}"] = (
                lambda x, f=ours, d=dim: f(x, d),
                lambda x, f=theirs, d=dim: f(x, d),
                (_rand((3, 5), 0),),
            )
    labels = _labels(4, 5)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        options = {"weight": weight, "label_smoothing": 0.1, "reduction": reduction}
        cases[f"ce-labels-{reduction}"] = (
            lambda x, o=options: interop.cross_entropy(x, labels, **o),
            lambda x, o=options: F.cross_entropy(x, labels, **o),
            (_rand((4, 5), 1),),
        )
        # Probability targets are differentiable too (ignore_index must be negative).
        cases[f"ce-probabilities-{reduction}"] = (
            lambda x, q, r=reduction: interop.cross_entropy(x, q, reduction=r, label_smoothing=0.2),
            lambda x, q, r=reduction: F.cross_entropy(x, q, reduction=r, label_smoothing=0.2),
            (_rand((4, 5), 2), _probabilities((4, 5))),
        )
    spatial = torch.tensor(np.random.default_rng(5).integers(0, 3, (2, 4)))
    cases["ce-spatial-none"] = (
        lambda x: interop.cross_entropy(x, spatial, reduction="none"),
        lambda x: F.cross_entropy(x, spatial, reduction="none"),
        (_rand((2, 3, 4), 6),),
    )
    return cases


CASES = _cases()
SOFTMAX_CASES = [name for name in CASES if not name.startswith("ce")]


def _tangents(inputs, seed=10):
    return tuple(_rand(tuple(x.shape), seed + i) for i, x in enumerate(inputs))


def _assert_close(ours, theirs):
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(theirs)
        for mine, torchs in zip(ours, theirs, strict=True):
            _assert_close(mine, torchs)
        return
    assert ours is not None, "no derivative where torch has one"
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), **GRAD_TOL)


# --------------------------------------------------------------------------------------------
# forward mode (torch.autograd.forward_ad): 12.3 and 15.4


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_ad_dual_tensors_give_torchs_tangent(case, requires_grad):
    ours, theirs, inputs = CASES[case]
    tangents = _tangents(inputs)
    results = []
    for fn in (ours, theirs):
        with fwAD.dual_level():
            duals = [
                fwAD.make_dual(x.clone().requires_grad_(requires_grad), t)
                for x, t in zip(inputs, tangents, strict=True)
            ]
            primal, tangent = fwAD.unpack_dual(fn(*duals))
            results.append((primal.detach(), tangent))
    _assert_close(results[0], results[1])


def test_forward_ad_issue_example():
    # The issue's numbers: softmax of [1, 2, 3] with tangent [1, 0, 0].
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0]))
        tangent = fwAD.unpack_dual(interop.softmax(dual, 0)).tangent
    assert tangent is not None
    np.testing.assert_allclose(tangent.numpy(), [0.0819, -0.0220, -0.0599], atol=1e-4)


@pytest.mark.parametrize("case", SOFTMAX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_ad_low_precision(case, dtype):
    ours, theirs, (x,) = CASES[case]
    x, t = x.to(dtype), _rand(tuple(x.shape), 10, dtype)
    tangents = []
    for fn in (ours, theirs):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent)
    assert tangents[0].dtype == dtype
    np.testing.assert_allclose(
        tangents[0].double().numpy(),
        tangents[1].double().numpy(),
        **tolerance("bfloat16" if dtype == torch.bfloat16 else "float32", grad=True),
    )


def test_forward_ad_of_a_masked_row_is_zero_not_nan():
    # jsoftmax's rule: a row of all -inf is constant (value 0 / -inf, derivative 0).
    x = torch.tensor([[1.0, 2.0, 3.0], [float("-inf")] * 3])
    for fn in (interop.softmax, interop.log_softmax):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.ones(2, 3)), 1)).tangent
        assert torch.equal(tangent[1], torch.zeros(3))
        assert torch.allclose(tangent[0], torch.zeros(3), atol=1e-6)  # a shift: no change


# --------------------------------------------------------------------------------------------
# torch.func: 12.4 and 15.4


def _func_results(fn, inputs, transform):
    argnums = tuple(range(len(inputs)))
    if transform == "grad":
        return torch.func.grad(lambda *a: fn(*a).sum(), argnums=argnums)(*inputs)
    if transform == "vjp":
        out, pullback = torch.func.vjp(fn, *inputs)
        return out, pullback(_rand(tuple(out.shape), 20))
    if transform == "jacrev":
        return torch.func.jacrev(fn, argnums=argnums)(*inputs)
    if transform == "jvp":
        return torch.func.jvp(fn, inputs, _tangents(inputs))
    if transform == "jacfwd":
        return torch.func.jacfwd(fn, argnums=argnums)(*inputs)
    if transform == "vmap":
        batched = tuple(torch.stack([x, x.flip(0)]) for x in inputs)
        return torch.func.vmap(fn)(*batched)
    if transform == "vmap_grad":
        batched = tuple(torch.stack([x, x.flip(0)]) for x in inputs)
        return torch.func.vmap(torch.func.grad(lambda *a: fn(*a).sum(), argnums=argnums))(*batched)
    raise AssertionError(transform)


TRANSFORMS = ["grad", "vjp", "jacrev", "jvp", "jacfwd", "vmap", "vmap_grad"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_func_transforms_give_torchs_values(case, transform):
    ours, theirs, inputs = CASES[case]
    _assert_close(_func_results(ours, inputs, transform), _func_results(theirs, inputs, transform))


# --------------------------------------------------------------------------------------------
# second derivatives: 15.4 (cross_entropy) and every route for all three


@pytest.mark.parametrize("case", sorted(CASES))
def test_double_backward_matches_torch(case):
    ours, theirs, inputs = CASES[case]
    directions = _tangents(inputs, seed=30)
    results = []
    for fn in (ours, theirs):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = fn(*leaves)
        weights = _rand(tuple(out.shape), 40)
        grads = torch.autograd.grad((out * weights).sum(), leaves, create_graph=True)
        dot = sum((g * d).sum() for g, d in zip(grads, directions, strict=True))
        results.append(torch.autograd.grad(dot, leaves))
    _assert_close(results[0], results[1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradgradcheck(case):
    ours, _, inputs = CASES[case]
    leaves = tuple(x.clone().requires_grad_() for x in inputs)
    assert torch.autograd.gradgradcheck(ours, leaves)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hessians_match_torch(case):
    ours, theirs, inputs = CASES[case]

    def scalar(fn):
        def value(*args):
            out = fn(*args)
            weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
            return (out * weights).sum()

        return value

    # torch.func.hessian is forward-over-reverse; torch.autograd.functional's reverse-over-reverse.
    _assert_close(
        torch.func.hessian(scalar(ours))(*inputs), torch.func.hessian(scalar(theirs))(*inputs)
    )
    _assert_close(
        torch.autograd.functional.hessian(scalar(ours), inputs),
        torch.autograd.functional.hessian(scalar(theirs), inputs),
    )


# --------------------------------------------------------------------------------------------
# compositions of order two and three: torch's value, or a clear error (never a silent zero)

J = torch.func
COMPOSITIONS = {
    # order two: all supported except forward over forward
    "rev-rev": lambda f: J.jacrev(J.grad(f)),
    "fwd-rev": lambda f: J.jacfwd(J.grad(f)),
    "rev-fwd": lambda f: J.jacrev(J.jacfwd(f)),
    "fwd-fwd": lambda f: J.jacfwd(J.jacfwd(f)),
    # order three
    "rev-rev-rev": lambda f: J.jacrev(J.jacrev(J.grad(f))),
    "fwd-rev-rev": lambda f: J.jacfwd(J.jacrev(J.grad(f))),
    "rev-fwd-rev": lambda f: J.jacrev(J.jacfwd(J.grad(f))),
    "rev-rev-fwd": lambda f: J.jacrev(J.jacrev(J.jacfwd(f))),
    "fwd-fwd-fwd": lambda f: J.jacfwd(J.jacfwd(J.jacfwd(f))),
}
SUPPORTED = {"rev-rev", "fwd-rev", "rev-fwd"}
REFUSAL = r"(order three and above are not implemented|nested in forward-mode AD)"


def _scalar_cases():
    labels = torch.tensor([0, 2])
    return {
        "softmax": (lambda x: interop.softmax(x, 1)[0, 0], lambda x: torch.softmax(x, 1)[0, 0]),
        "log_softmax": (
            lambda x: interop.log_softmax(x, 1)[0, 1],
            lambda x: torch.log_softmax(x, 1)[0, 1],
        ),
        "cross_entropy": (
            lambda x: interop.cross_entropy(x, labels),
            lambda x: F.cross_entropy(x, labels),
        ),
    }


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "cross_entropy"])
def test_compositions_give_torchs_value_or_raise(name, composition):
    ours, theirs = _scalar_cases()[name]
    transform = COMPOSITIONS[composition]
    x = _rand((2, 3), 50)
    expected = transform(theirs)(x)
    try:
        result = transform(ours)(x)
    except RuntimeError as err:
        assert composition not in SUPPORTED, f"{composition} must work, raised {err}"
        assert re.search(REFUSAL, str(err)), str(err)
        return
    # Some third-order compositions work: softmax's forward-mode rules are torch formulas.
    _assert_close(result, expected)


@pytest.mark.parametrize("case", ["softmax-dim1", "log_softmax-dim0", "ce-labels-none"])
def test_forward_ad_through_torch_compile(case):
    # A custom op traced by torch.compile loses its tangent silently; the functions leave the
    # graph inside a dual level instead, and give torch's tangent.
    ours, theirs, inputs = CASES[case]
    compiled = torch.compile(ours, backend="aot_eager")
    tangents = _tangents(inputs)
    results = []
    for fn in (compiled, theirs):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, t) for x, t in zip(inputs, tangents, strict=True)]
            results.append(fwAD.unpack_dual(fn(*duals)).tangent)
    _assert_close(results[0], results[1])


@pytest.mark.parametrize("log", [False, True])
def test_forward_mode_matches_the_cores_jvp_on_special_rows(log):
    # The torch-side tangent rule and jsoftmax's JAX JVP agree where torch itself gives NaN:
    # -inf entries, rows of all -inf, +inf entries.
    import jax
    import jax.numpy as jnp

    import jsoftmax

    inf = float("inf")
    x = torch.tensor(
        [
            [1.0, -inf, 3.0, 0.5],
            [-inf, -inf, -inf, -inf],
            [inf, 2.0, inf, -inf],
            [0.0, 1.0, 2.0, 3.0],
        ],
        dtype=torch.float64,
    )
    t = _rand((4, 4), 60)
    with fwAD.dual_level():
        fn = interop.log_softmax if log else interop.softmax
        ours = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), 1)).tangent
    core = jsoftmax.log_softmax if log else jsoftmax.softmax
    with jax.enable_x64(True):
        _, expected = jax.jvp(
            lambda a: core(a, axis=1), (jnp.asarray(x.numpy()),), (jnp.asarray(t.numpy()),)
        )
        expected = np.asarray(expected)
    np.testing.assert_allclose(ours.numpy(), expected, **GRAD_TOL)
    assert np.isfinite(ours.numpy()).all()
