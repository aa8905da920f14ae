"""The package: public names, version, typing marker, and that the core never imports torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import jsoftmax

# Prints whether torch is loaded after running the given imports in a fresh interpreter.
PROBE = "import sys; {imports}; print('torch' in sys.modules)"


def _torch_loaded_after(imports: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def test_import_jsoftmax_does_not_import_torch():
    assert (
        _torch_loaded_after("import jsoftmax; jsoftmax.softmax([0.0]) if False else None") is False
    )


def test_probe_detects_torch_when_it_is_imported():
    assert _torch_loaded_after("import jsoftmax; import torch") is True


def test_public_names():
    assert set(jsoftmax.__all__) >= {"softmax", "log_softmax", "logsumexp", "__version__"}
    for name in jsoftmax.__all__:
        assert hasattr(jsoftmax, name), name
    assert jsoftmax.__version__ != "0+unknown"  # installed: the version comes from metadata


def test_ships_py_typed():
    assert resources.files("jsoftmax").joinpath("py.typed").is_file()
