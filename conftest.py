"""Root pytest configuration.

Eight simulated CPU devices for the sharding tests: XLA reads this flag once, when JAX starts, so
it is set here, before any test module imports JAX. Tests on one device are unaffected.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The CPU kernels (jsoftmax/_kernel.py): with several devices, "auto" would leave every test on the
# XLA path, so the suite runs with "on", as a single-device process does by default. The sharding
# tests set "auto" (the XLA path, which partitions) and tests/test_cpu_kernel.py compares the two.
os.environ.setdefault("JSOFTMAX_CPU_KERNEL", "on")

# Run by tests/test_accelerators.py with the accelerator compilers' own interpreter; importing it
# here (doctest collection) would need those compilers.
collect_ignore = ["tests/aot_kernel_counts.py"]
