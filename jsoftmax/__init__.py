"""jsoftmax: the stable, masked, jitted softmax for JAX, with hand-written VJPs."""

from importlib.metadata import PackageNotFoundError, version

from ._cross_entropy import cross_entropy as cross_entropy
from ._kernel import cpu_kernel_info as cpu_kernel_info
from ._softmax import log_softmax as log_softmax
from ._softmax import logsumexp as logsumexp
from ._softmax import softmax as softmax

try:
    __version__ = version("jsoftmax")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "cpu_kernel_info",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
]
