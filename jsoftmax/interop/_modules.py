"""torch.nn modules wrapping the torch-facing jsoftmax functions."""

from __future__ import annotations

import torch

from ._ops import log_softmax, normalize_dim, softmax


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
        return log_softmax(input, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
