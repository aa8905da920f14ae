"""jsoftmax.interop: zero-copy DLPack bridges and torch-facing functions backed by jsoftmax.

The only part of jsoftmax that imports torch. ``from_torch`` / ``to_torch`` share memory
between torch tensors and JAX arrays; ``softmax``, ``log_softmax`` and the matching
``torch.nn`` modules run jsoftmax's JAX code forward and its custom VJP backward, through torch
autograd and under ``torch.compile``; ``cross_entropy`` / ``CrossEntropyLoss`` do the same for
``jsoftmax.cross_entropy`` with torch's conventions. Forward-mode AD and ``torch.func``
transformations work through all three.

Processes: JAX starts thread pools when it first runs, and a process forked after that (a torch
``DataLoader`` with the default ``fork`` workers on Linux, ``multiprocessing`` with ``fork``) can
hang in the child. This is JAX's behaviour, not jsoftmax's. Start workers with spawn instead:
``DataLoader(..., num_workers=n, multiprocessing_context="spawn")`` (or
``torch.multiprocessing.set_start_method("spawn")``), and keep the dataset and collate function
importable (defined in a module, under ``if __name__ == "__main__":`` in scripts).
"""

from ._convert import from_torch as from_torch
from ._convert import to_torch as to_torch
from ._convert import to_torch_shards as to_torch_shards
from ._cross_entropy import CrossEntropyLoss as CrossEntropyLoss
from ._cross_entropy import cross_entropy as cross_entropy
from ._modules import LogSoftmax as LogSoftmax
from ._modules import Softmax as Softmax
from ._ops import log_softmax as log_softmax
from ._ops import softmax as softmax

__all__ = [
    "CrossEntropyLoss",
    "LogSoftmax",
    "Softmax",
    "cross_entropy",
    "from_torch",
    "log_softmax",
    "softmax",
    "to_torch",
    "to_torch_shards",
]
