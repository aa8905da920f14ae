"""The torch-facing ops as torch.library custom ops: opcheck and torch.compile.

These are the slow interop tests (a few seconds each: inductor compiles C++ on CPU), so they are
few and use tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from jsoftmax import interop
from jsoftmax.interop import _cross_entropy, _ops

# Raised inside torch when inductor loads, not by this project.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


def _leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float32).requires_grad_()


@pytest.mark.parametrize("log", [False, True])
def test_opcheck_forward_and_backward_ops(log):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch, as
    # torch.library documents for custom ops.
    x = _leaf(3, 5)
    torch.library.opcheck(_ops._softmax_op, (x, 1, log))
    torch.library.opcheck(_ops._softmax_op, (x.detach().t(), 0, log))
    output = _ops._softmax_op(x.detach(), 1, log)
    grad = _leaf(3, 5, seed=1).detach()
    torch.library.opcheck(_ops._softmax_backward_op, (grad, output, 1, log))
    grad_grad = _leaf(3, 5, seed=2).detach()
    torch.library.opcheck(_ops._softmax_double_backward_op, (grad_grad, grad, output, 1, log))


def _model_step(softmax_fn, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ weight)
    return (softmax_fn(hidden, dim=-1) * torch.arange(hidden.shape[-1])).sum()


def test_inductor_fullgraph_forward_and_backward_match_eager_torch():
    compiled = torch.compile(_model_step, backend="inductor", fullgraph=True)
    x_ours, weight_ours = _leaf(4, 6), _leaf(6, 5, seed=1)
    x_ref, weight_ref = _leaf(4, 6), _leaf(6, 5, seed=1)
    ours = compiled(interop.softmax, x_ours, weight_ours)
    reference = _model_step(torch.softmax, x_ref, weight_ref)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(weight_ours.grad, weight_ref.grad)


def test_compiled_module_in_sequential_with_no_graph_break():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), interop.LogSoftmax(dim=1))
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LogSoftmax(dim=1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = _leaf(3, 6).detach()
    ours, theirs = compiled(x), reference(x)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs)
    for mine, torchs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, torchs.grad)


def test_opcheck_cross_entropy_ops():
    logits = _leaf(4, 3)
    labels = torch.tensor([0, 2, 1, -100])
    probabilities = torch.softmax(_leaf(4, 3, seed=3), 1).detach().requires_grad_()
    weight = torch.tensor([1.0, 2.0, 0.5])
    op = _cross_entropy._forward_op
    torch.library.opcheck(op, (logits, labels, weight, 1, -100, "mean", 0.1))
    torch.library.opcheck(op, (logits, probabilities, None, 1, -100, "none", 0.0))
    backward = _cross_entropy._backward_op
    grad_loss = torch.tensor([1.0, 2.0, 0.5, 1.5])
    torch.library.opcheck(
        backward, (grad_loss, logits, labels, weight, 1, -100, "none", 0.1, False)
    )
    torch.library.opcheck(
        backward, (torch.tensor(2.0), logits, probabilities, None, 1, -100, "mean", 0.0, True)
    )
    # Its own derivative (a third derivative) raises by design: opcheck it without grad.
    grad_grads = [_leaf(4, 3, seed=4).detach(), _leaf(4, 3, seed=5).detach()]
    primals = (logits.detach(), probabilities.detach())
    torch.library.opcheck(
        _cross_entropy._double_backward_op,
        (grad_grads, torch.tensor(2.0), *primals, None, 1, -100, "mean", 0.0),
    )


def test_compiled_cross_entropy_loss_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    labels = torch.tensor([0, 3, 1, -100, 2])

    def step(loss_fn, x):
        return loss_fn(model(x), labels)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = _leaf(5, 6).detach()
    ours = compiled(interop.CrossEntropyLoss(label_smoothing=0.1), x)
    (ours_grad,) = torch.autograd.grad(ours, model.weight)
    theirs = step(torch.nn.CrossEntropyLoss(label_smoothing=0.1), x)
    (theirs_grad,) = torch.autograd.grad(theirs, model.weight)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
