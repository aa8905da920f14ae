#!/usr/bin/env bash
# The GPU run, everything in one folder ready to commit: the machine, the CUDA tests, then
# `python -m benchmarks --device gpu --quick` (headline shapes and a 1k..256k row-length sweep,
# f32 and bf16, forward and forward+backward, bandwidth as % of a copy timed in the same run).
#
#   bash benchmarks/gpu_run.sh OUTDIR [more arguments for python -m benchmarks]
#
# For a GPU machine with jax and torch installed and no package index: jsoftmax, if not
# installed, is installed without dependencies, or used from the source tree when that fails.
# 5-6 minutes: the tests are cut at 2, no benchmark case starts after 3.5 and the benchmark is
# cut at 5.5 (it saves after every measurement): at most 8 minutes with the install.
# BENCH_DEVICE=cpu runs the same path on a CPU machine (the CUDA tests then skip), e.g.
#   BENCH_DEVICE=cpu bash benchmarks/gpu_run.sh /tmp/gpu-dry-run --smoke
set -u
out=${1:?usage: bash benchmarks/gpu_run.sh OUTDIR [benchmark arguments]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
if ! python -c "import importlib.metadata as m; m.version('jsoftmax')" 2>/dev/null; then
  python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1 ||
    echo "install failed: using the source tree (PYTHONPATH)" >>"$out/install.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())"
} >"$out/machine.txt" 2>&1
timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_interop_cuda.py >"$out/cuda-tests.txt" 2>&1
echo "pytest exit status $?" >>"$out/cuda-tests.txt"
# The short sections first: the time limit cuts only the timing cases.
timeout 330 python -m benchmarks --device "${BENCH_DEVICE:-gpu}" --quick --time-limit 210 \
  --only accuracy,interop,overhead,cross_entropy,timing --out "$out" "$@" \
  >"$out/stdout.txt" 2>"$out/progress.txt"
status=$?
tail -n 3 "$out/cuda-tests.txt"
tail -n 2 "$out/stdout.txt"
echo "gpu_run: benchmark exit status $status; everything is in $out"
exit $status
