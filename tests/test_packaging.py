"""Packaging: the wheel built from this tree carries the compiled kernels and runs them where no
compiler exists; without a compiler the build still installs and the XLA path says so.

Slow (two wheel builds and fresh interpreters: about a minute of builds). Wheels are built from
a copy of the sources in a temporary directory without build isolation (this environment's
scikit-build-core, cmake, ninja, jax and jaxlib), so the working tree gets no build output and
no network is needed. Each wheel is installed into a fresh virtual environment that sees this
one's packages (jax, torch) only through a .pth line, after its own, and runs with a PATH that
holds no compiler and ``CXX`` pointing nowhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
NO_COMPILER = "/nonexistent/c++"

# Run in a fresh interpreter of the fresh environment, from a directory outside the repository.
PROBE = """
import json, time, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    start = time.perf_counter()
    import jax.numpy as jnp
    import numpy as np
    import jsoftmax
    imported = time.perf_counter()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32))
    y = jsoftmax.softmax(x).block_until_ready()
    first_call = time.perf_counter()
    jsoftmax.log_softmax(x).block_until_ready()
    jsoftmax.softmax(x[:, :500]).block_until_ready()
import torch
import jsoftmax.interop as interop
x64 = np.asarray(x, np.float64)
exact = np.exp(x64 - x64.max(-1, keepdims=True))
exact /= exact.sum(-1, keepdims=True)
print(json.dumps({
    "core": jsoftmax.__file__,
    "interop": interop.__file__,
    "names": sorted(interop.__all__),
    "torch_softmax": interop.softmax(torch.zeros(2), 0).tolist(),
    "info": jsoftmax.cpu_kernel_info(),
    "error": float(np.max(np.abs(np.asarray(y, np.float64) - exact))),
    "import_s": imported - start,
    "first_call_s": first_call - imported,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                 if "jsoftmax" in str(w.message)],
}))
"""


def _build_wheel(tmp: Path, env: dict[str, str]) -> tuple[Path, float]:
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy2(REPO / name, source / name)
    for name in ("jsoftmax", "cmake"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    start = time.perf_counter()
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("jsoftmax-*.whl")
    return wheel, time.perf_counter() - start


def _compiler_free_env(tmp: Path) -> dict[str, str]:
    """This environment with a PATH of cmake and ninja only, and CXX / CC pointing nowhere."""
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    for tool in ("cmake", "ninja"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed to build the wheel (pip install '.[test]' installs it)"
        if not (tools / tool).exists():
            (tools / tool).symlink_to(found)
    for compiler in ("c++", "g++", "clang++", "cc", "gcc"):
        assert not (tools / compiler).exists()
    env = {**os.environ, "PATH": str(tools), "CXX": NO_COMPILER, "CC": NO_COMPILER}
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    return env


def _fresh_venv(path: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A virtual environment with ``wheel`` installed, seeing this one's packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


def _probe(python: Path, cwd: Path, env: dict[str, str]) -> dict:
    probe_env = {key: value for key, value in env.items() if not key.startswith("JSOFTMAX_")}
    flags = probe_env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    probe_env["XLA_FLAGS"] = flags.strip()  # one device: "auto" uses the kernels
    result = subprocess.run(
        [str(python), "-c", PROBE], cwd=cwd, env=probe_env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def with_kernels(tmp_path_factory):
    """(wheel, fresh environment's python, compiler-free env) for a build with a compiler."""
    tmp = tmp_path_factory.mktemp("with_kernels")
    build_env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    wheel, seconds = _build_wheel(tmp, build_env)
    print(f"\nwheel {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB, built in {seconds:.1f} s")
    env = _compiler_free_env(tmp)
    return wheel, _fresh_venv(tmp / "venv", wheel, env), env


def test_wheel_carries_the_kernels_and_not_their_source(with_kernels):
    wheel, _, _ = with_kernels
    assert not wheel.name.endswith("-any.whl"), f"{wheel.name}: a wheel with libraries is platform"
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"jsoftmax/interop/{path.name}" for path in (REPO / "jsoftmax" / "interop").glob("*.py")
    } | {"jsoftmax/__init__.py", "jsoftmax/py.typed", "jsoftmax/_cpu/manifest.json"}
    assert expected <= names, expected - names
    manifest = json.loads(zipfile.ZipFile(wheel).read("jsoftmax/_cpu/manifest.json"))
    assert "generic" in manifest["libraries"], manifest
    for entry in manifest["libraries"].values():
        assert f"jsoftmax/_cpu/{entry['file']}" in names, entry
    assert not any(name.endswith(".cc") for name in names)
    assert not any(name.startswith("interop/") for name in names)  # no stray top-level package


def test_wheel_runs_the_kernels_on_the_first_call_without_a_compiler(with_kernels, tmp_path):
    _, python, env = with_kernels
    assert shutil.which("c++", path=env["PATH"]) is None  # the probe below has no compiler
    found = _probe(python, tmp_path, env)
    site = python.parents[1]
    assert Path(found["core"]).is_relative_to(site), found["core"]  # the wheel, not this tree
    assert Path(found["interop"]).is_relative_to(site), found["interop"]
    info = found["info"]
    assert info["available"] is True and info["error"] is None, info
    assert info["mode"] == "auto" and info["single_cpu_device"] is True, info
    assert Path(info["library"]).is_relative_to(site), info["library"]
    assert info["isa"] == info["cpu_isa"], info
    assert found["warnings"] == [], found["warnings"]
    assert found["error"] < 1e-6
    assert "from_torch" in found["names"] and found["torch_softmax"] == [0.5, 0.5]
    print(f"\nimport {found['import_s']:.2f} s, first call {found['first_call_s']:.2f} s")


def test_damaged_library_falls_back_with_one_warning(with_kernels, tmp_path):
    # A truncated library (a partial copy) used to kill the process with SIGBUS when mapped.
    _, python, env = with_kernels
    damaged = tmp_path / "venv"
    shutil.copytree(python.parents[1], damaged, symlinks=True)
    site = next(damaged.glob("lib/python*/site-packages"))
    manifest = json.loads((site / "jsoftmax/_cpu/manifest.json").read_text())
    for entry in manifest["libraries"].values():
        library = site / "jsoftmax/_cpu" / entry["file"]
        library.write_bytes(library.read_bytes()[:100_000])
    found = _probe(damaged / "bin" / "python", tmp_path, env)
    info = found["info"]
    assert info["available"] is False and info["library"] is None, info
    assert "does not match its build manifest" in info["error"], info
    assert len(found["warnings"]) == 1, found["warnings"]
    assert "XLA path" in found["warnings"][0] and "RuntimeWarning" in found["warnings"][0]
    assert found["error"] < 1e-6


def test_build_without_a_compiler_installs_and_warns_once(tmp_path):
    env = _compiler_free_env(tmp_path)
    wheel, _ = _build_wheel(tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.startswith("jsoftmax/_cpu/") for name in names), names
    assert "jsoftmax/__init__.py" in names
    found = _probe(_fresh_venv(tmp_path / "venv", wheel, env), tmp_path, env)
    info = found["info"]
    assert info["available"] is False and "no compiled kernels" in info["error"], info
    assert len(found["warnings"]) == 1 and "XLA path" in found["warnings"][0], found["warnings"]
    assert found["error"] < 1e-6
