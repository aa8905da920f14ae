"""Packaging: a built wheel ships ``jsoftmax`` with ``jsoftmax.interop`` and imports from it.

Slow-ish (builds a wheel and starts fresh interpreters: ~10 s in all). The wheel is built from a
copy of the sources in a temporary directory, so the working tree gets no build/ or egg-info.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter, from a directory outside the repository, so that the import comes
# from the installation under test and never from the working directory.
PROBE = """
import json
import torch
import jsoftmax, jsoftmax.interop as interop
print(json.dumps({
    "core": jsoftmax.__file__,
    "interop": interop.__file__,
    "names": sorted(interop.__all__),
    "softmax": interop.softmax(torch.zeros(2), 0).tolist(),
    }))
"""


def _probe(cwd: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_built_wheel_ships_and_imports_jsoftmax_interop(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "jsoftmax", source / "jsoftmax", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("jsoftmax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"jsoftmax/interop/{path.name}" for path in (REPO / "jsoftmax" / "interop").glob("*.py")
    } | {
        "jsoftmax/__init__.py",
        "jsoftmax/py.typed",
    }
    assert expected <= names
    assert not any(name.startswith("interop/") for name in names)  # no stray top-level package

    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    found = _probe(tmp_path, extra_path=site)
    assert Path(found["interop"]) == site / "jsoftmax" / "interop" / "__init__.py"
    assert Path(found["core"]) == site / "jsoftmax" / "__init__.py"
    assert "from_torch" in found["names"] and "softmax" in found["names"]
    assert found["softmax"] == [0.5, 0.5]
