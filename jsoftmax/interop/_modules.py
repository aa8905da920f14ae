"""torch.nn modules wrapping the torch-facing jsoftmax functions.

They script with ``torch.jit.script`` as ``nn.Softmax`` does: TorchScript calls the registered
custom op ``jsoftmax::softmax`` (with its autograd formula) directly, after the same dim and dtype
checks; eager calls take the Python function.
"""

from __future__ import annotations

import torch

from ._ops import log_softmax, normalize_dim, softmax


def _scripted(input: torch.Tensor, dim: int, log: bool, fname: str) -> torch.Tensor:
    """The module's forward as TorchScript compiles it: the checks, then the custom op."""
    if not input.is_floating_point():
        raise TypeError(
            fname + ": input expected a floating tensor (float16, bfloat16, float32, float64), "
            "got " + str(input.dtype)
        )
    rank = max(input.dim(), 1)
    if dim < -rank or dim >= rank:
        raise IndexError(
            fname + ": dim expected an int in [" + str(-rank) + ", " + str(rank - 1) + "] for a "
            "tensor of rank " + str(input.dim()) + ", got " + str(dim)
        )
    if input.dim() == 0:
        return torch.ops.jsoftmax.softmax(input.reshape(1), 0, log).reshape(())
    return torch.ops.jsoftmax.softmax(input, dim % rank, log)


def _checked_dim(dim: int, fname: str) -> int:
    # The range depends on the input, so only the kind is checked here; normalize_dim with a
    # large rank accepts any int and rejects everything else with the usual message.
    normalize_dim(dim, 1 << 30, fname)
    return dim


class Softmax(torch.nn.Module):
    """``torch.nn.Softmax`` computed by jsoftmax (see :func:`jsoftmax.interop.softmax`).

    Args:
      dim: the dimension to normalise over (negative allowed); required, unlike the deprecated
        implicit choice of ``torch.nn.Softmax(dim=None)``.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> layer = interop.Softmax(dim=-1)
      >>> print(layer, layer(torch.tensor([0.0, 0.0])))
      Softmax(dim=-1) tensor([0.5000, 0.5000])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = _checked_dim(dim, "Softmax")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return _scripted(input, self.dim, False, "Softmax")
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: torch.Tensor) -> torch.Tensor:
        return softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(torch.nn.Module):
    """``torch.nn.LogSoftmax`` computed by jsoftmax (see :func:`jsoftmax.interop.log_softmax`).

    Args:
      dim: the dimension to normalise over (negative allowed); required.

    Example:
      >>> import torch
      >>> from jsoftmax import interop
      >>> layer = interop.LogSoftmax(dim=1)
      >>> print(layer, layer(torch.zeros(1, 2)))
      LogSoftmax(dim=1) tensor([[-0.6931, -0.6931]])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = _checked_dim(dim, "LogSoftmax")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return _scripted(input, self.dim, True, "LogSoftmax")
        return self._eager(input)

    @torch.jit.unused
    def _eager(self, input: torch.Tensor) -> torch.Tensor:
        return log_softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
