"""The benchmark harness: one tiny run end to end through the GPU script's path, and its
failure paths. No timing assertions: the figures of a 3-round run on tiny inputs mean nothing.
"""

from __future__ import annotations

import contextlib
import csv
import doctest
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import benchmarks
from benchmarks import __main__ as cli
from benchmarks import _contenders, _measure, _plan, _plots, _report, _sections

ROOT = Path(__file__).resolve().parent.parent
ALL = ",".join(_plan.SECTIONS)  # the script runs the quick sections; the smoke run every one
ROUNDED = {"rel": 2e-3}  # results.json keeps 4 significant digits
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``benchmarks/gpu_run.sh`` dry-run on the CPU: the CUDA tests (skipped here), then every
    section of the benchmark at tiny sizes, into one folder."""
    out = tmp_path_factory.mktemp("gpu-run")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JSOFTMAX_CPU_KERNEL")}
    env |= {"BENCH_DEVICE": "cpu", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", str(out), "--smoke", "--no-compile", "--only", ALL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = _report.load_report(out / "results.json")
    return {
        "code": done.returncode,
        "stdout": done.stdout + done.stderr,
        "out": out,
        "report": report,
    }


def test_gpu_script_runs_the_cuda_tests_and_every_section(smoke):
    assert smoke["code"] == 0, smoke["stdout"]
    out: Path = smoke["out"]
    assert "skipped" in (out / "cuda-tests.txt").read_text()  # collected, and skipped without a GPU
    written = {path.name for path in out.iterdir()}
    sections = {row["section"] for row in smoke["report"]["rows"]}
    assert sections == {*_plan.SECTIONS, "conversion", "loss_accuracy"}
    expected = {"report.md", "results.json", "bandwidth_float32.png", "accuracy.png", "interop.png"}
    assert expected | {f"{section}.csv" for section in sections} <= written
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    for title in ("## Headline", "## Timings", "## Accuracy", "## Jitted steps", "## Plots"):
        assert title in markdown
    assert "failed" not in markdown
    stdout = (out / "stdout.txt").read_text()
    assert "Took " in stdout and "peak memory" in stdout and "Wrote results.json" in stdout


def test_every_planned_case_has_every_contender_and_a_copy_reference(smoke):
    config, _ = cli.config_from_args(["--smoke", "--no-compile"])
    rows = [row for row in smoke["report"]["rows"] if row["section"] == "timing"]
    measured = {(row["case"], row["contender"]) for row in rows if "median_s" in row}
    for case in _plan.plan_cases(config):
        for name in config.case_contenders(case):
            assert (case.label(), name) in measured
    for shape in {tuple(row["shape"]) for row in rows}:
        copies = {
            r["contender"]
            for r in rows
            if tuple(r["shape"]) == shape and r["contender"] in _plan.COPIES
        }
        assert copies == set(_plan.COPIES)


def test_timing_rows_derive_their_figures_from_the_median(smoke):
    rows = [row for row in smoke["report"]["rows"] if "median_s" in row]
    for row in rows:
        assert 0 < row["p20_s"] <= row["median_s"] <= row["p80_s"]
        assert row["rounds"] == (7 if row["section"] == "plain" else 3)
        if row["section"] == "timing":
            factor = _plan.BYTES_FACTOR["copy" if row["contender"] in _plan.COPIES else row["pass"]]
            assert row["model_bytes"] == factor * math.prod(row["shape"]) * 4
            assert row["gbps"] == pytest.approx(
                row["model_bytes"] / row["median_s"] / 1e9, **ROUNDED
            )
            if row["contender"] not in _plan.COPIES:
                assert row["pct_of_copy"] == pytest.approx(
                    100 * row["gbps"] / row["copy_gbps"], **ROUNDED
                )
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["contender"] not in _plan.COPIES:
            by_case.setdefault((row["section"], row["case"]), []).append(row)
    for group in by_case.values():
        for row in group:
            others = [other for other in group if other is not row]
            if others:
                best = min(others, key=lambda other: other["median_s"])
                assert row["best_other"] == best["contender"]
                assert row["ratio_to_best_other"] == pytest.approx(
                    row["median_s"] / best["median_s"], **ROUNDED
                )


def test_headline_is_the_geomean_of_the_measured_headline_shape(smoke):
    report = smoke["report"]
    entries = {(e["section"], e["op"], e["pass"]): e for e in report["headline"]}
    assert {key for key in entries if key[0] == "timing"} == {
        ("timing", op, p) for op in _plan.OPS for p in _plan.PASSES
    }
    for (section, op, pass_), entry in entries.items():
        (row,) = [
            r
            for r in report["rows"]
            if (r["section"], r.get("op"), r.get("pass"), r["contender"])
            == (section, op, pass_, "jsoftmax")
            and r["shape"] == [64, 4096]
            and r["dtype"] == "float32"
        ]
        assert entry["cases"] == 1
        assert entry["geomean_ratio"] == pytest.approx(row["ratio_to_best_other"], **ROUNDED)
    assert (
        f"**{report['headline'][0]['geomean_ratio']:.2f}x**"
        in (smoke["out"] / "report.md").read_text()
    )


def test_csv_holds_the_json_rows(smoke):
    with (smoke["out"] / "timing.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    json_rows = [row for row in smoke["report"]["rows"] if row["section"] == "timing"]
    assert [row["contender"] for row in csv_rows] == [row["contender"] for row in json_rows]
    for csv_row, json_row in zip(csv_rows, json_rows, strict=True):
        assert csv_row["shape"] == "x".join(map(str, json_row["shape"]))
        assert float(csv_row["median_s"]) == json_row["median_s"]


def test_accuracy_has_the_floor_and_every_contender(smoke):
    rows = [row for row in smoke["report"]["rows"] if row["section"] == "accuracy"]
    assert {row["contender"] for row in rows} == {
        "floor",
        "jsoftmax",
        "jax.nn",
        "jnp-naive",
        "torch",
    }
    for row in rows:
        if row["contender"] == "floor":
            assert 0 < row["max_rel_error"] <= UNIT_ROUNDOFF[row["dtype"]]
        # The right arrays are compared: a mismatch would give errors of order 1.
        assert 0 <= row["median_rel_error"] <= row["max_rel_error"] < 0.1
        if row["contender"] == "jsoftmax" and row["dtype"] != "float32":
            assert row["max_rel_error"] <= 2 * UNIT_ROUNDOFF[row["dtype"]]  # rounds once
    losses = [row for row in smoke["report"]["rows"] if row["section"] == "loss_accuracy"]
    assert {row["contender"] for row in losses} == {"jsoftmax", "jax.nn", "optax", "torch"}
    assert all(row["rel_error"] < 1e-5 for row in losses)


def test_results_page_renders_from_a_run_folder(smoke, tmp_path):
    folder = tmp_path / "results" / "cpu"
    folder.mkdir(parents=True)
    for path in smoke["out"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    page = _report.render_results(tmp_path)
    assert f"## CPU: {smoke['report']['environment']['cpu']}" in page
    assert "![bandwidth_float32.png](results/cpu/bandwidth_float32.png)" in page
    assert "`python -m benchmarks --device cpu --quick --time-limit" in page


def _tiny(out: Path, *extra: str) -> list[str]:
    return [
        "--smoke",
        "--only",
        "softmax",
        "--passes",
        "fwd",
        "--shapes",
        "8x64",
        "--out",
        str(out),
        *extra,
    ]


def test_a_failing_contender_and_failing_plots_lose_no_figure(tmp_path, monkeypatch):
    make_runner = _contenders.make_runner

    def jax_nn_fails(name, case, inputs):
        if name == "jax.nn":
            raise RuntimeError("no kernel for this case")
        return make_runner(name, case, inputs)

    def broken_loss(logits, labels):
        raise ValueError("broken loss")

    monkeypatch.setattr(_sections, "make_runner", jax_nn_fails)
    monkeypatch.setattr(
        _sections,
        "losses",
        lambda ctx: {"jsoftmax": _sections.jsoftmax.cross_entropy, "broken": broken_loss},
    )
    monkeypatch.setattr(_plots, "write_plots", lambda rows, out: 1 / 0)
    argv = _tiny(tmp_path, "--contenders", "jsoftmax,jax.nn")
    argv[argv.index("softmax")] = "softmax,cross_entropy"
    code, stdout, _ = _run_cli(argv)
    assert code == 0
    assert "Plots failed (ZeroDivisionError" in stdout
    report = _report.load_report(tmp_path / "results.json")
    failed = {(row["section"], row["contender"]) for row in report["rows"] if "error" in row}
    assert failed == {("timing", "jax.nn"), ("cross_entropy", "broken")}
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| failed |" in markdown
        and "jax.nn failed: RuntimeError: no kernel for this case" in markdown
    )
    assert any(
        row["contender"] == "jsoftmax" and "median_s" in row
        for row in report["rows"]
        if row["section"] == "cross_entropy"
    )


def test_missing_optional_packages_are_reported_first_and_the_rest_runs(tmp_path, monkeypatch):
    absent = {"torch", "matplotlib", "optax"}
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name: None if name in absent else find_spec(name)
    )
    monkeypatch.setattr(_sections, "_optional", lambda name: None)
    code, stdout, _ = _run_cli(_tiny(tmp_path))
    assert code == 0
    for name in absent:
        assert stdout.index(f"Optional package {name} is not installed") < stdout.index(
            "# jsoftmax benchmarks"
        )
    report = _report.load_report(tmp_path / "results.json")
    assert {row["contender"] for row in report["rows"]} == {
        "jsoftmax",
        "jax.nn",
        "jnp-naive",
        "copy:jax",
    }
    assert "torch is not installed: no torch contenders, no interop section" in report["notes"]
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.md").exists()


def test_time_limit_stops_starting_work_and_says_so(tmp_path):
    argv = _tiny(tmp_path, "--time-limit", "0", "--no-plots")
    argv[argv.index("softmax")] = "softmax,overhead"
    assert _run_cli(argv)[0] == 0
    report = _report.load_report(tmp_path / "results.json")
    assert report["rows"] == []
    assert report["notes"] == [
        f"--time-limit reached: section {s} skipped" for s in ("overhead", "timing")
    ]
    assert "Not measured in this run" in (tmp_path / "report.md").read_text()


def test_merge_joins_a_run_split_into_parts(tmp_path):
    assert _run_cli(_tiny(tmp_path, "--contenders", "jsoftmax,jax.nn", "--no-plots"))[0] == 0
    argv = _tiny(tmp_path, "--contenders", "jsoftmax,jax.nn", "--no-plots", "--merge")
    argv[argv.index("8x64")] = "8x128"
    assert _run_cli(argv)[0] == 0
    merged = _report.load_report(tmp_path / "results.json")
    assert {row["case"] for row in merged["rows"] if row["contender"] == "jsoftmax"} == {
        "softmax f32 fwd 8x64",
        "softmax f32 fwd 8x128",
    }
    assert "--shapes 8x64" in merged["merged_from"][0] and merged["summary"][0]["cases"] == 2


def test_measure_interleaves_rounds_and_turns_failures_into_rows():
    calls: list[str] = []

    def fails_after_warm_up() -> None:
        calls.append("late")
        if calls.count("late") > 3:
            raise RuntimeError("out of memory")

    runners = [
        _measure.Runner("a", lambda: calls.append("a")),
        ("setup", KeyError("median_s")),
        _measure.Runner("late", fails_after_warm_up),
        _measure.Runner("b", lambda: calls.append("b")),
    ]
    rows = _measure.measure(runners, budget_s=0.0, rounds=(4, 4), sample_s=0.0)
    assert [row["contender"] for row in rows] == ["a", "setup", "late", "b"]
    assert (
        rows[1]["error"] == "KeyError: 'median_s'"
        and rows[2]["error"] == "RuntimeError: out of memory"
    )
    assert rows[0]["rounds"] == rows[3]["rounds"] == 4
    # After the warm-up, every round runs each live runner once, in orders that vary.
    order = [call for call in calls if call != "late"]
    rounds = [tuple(order[i : i + 2]) for i in range(len(order) - 8, len(order), 2)]
    assert all(sorted(pair) == ["a", "b"] for pair in rounds), rounds


def test_measure_gives_every_runner_every_predecessor():
    # A contender that leaves work behind (spinning threads) must not always precede the same
    # one: over the rounds each runner follows each of the others.
    calls: list[str] = []
    names = "abcd"
    runners = [_measure.Runner(n, lambda n=n: calls.append(n)) for n in names]
    _measure.measure(runners, budget_s=0.0, rounds=(40, 40), sample_s=0.0)
    timed = calls[-160:]
    assert all(sorted(timed[i : i + 4]) == list(names) for i in range(0, 160, 4))
    pairs = {(timed[i - 1], timed[i]) for i in range(1, 160)}
    assert {(p, n) for p in names for n in names if p != n} <= pairs


def test_samples_start_after_idling_and_one_untimed_call(monkeypatch):
    # settle_s: idle first (what the previous contender left spinning stops), then, for a
    # sample of several calls, one call outside the timing wakes the contender's own threads.
    slept: list[float] = []
    monkeypatch.setattr(_measure.time, "sleep", slept.append)
    calls: list[int] = []
    runner = _measure.Runner("a", lambda: calls.append(1))
    for inner, settle_s, expected_calls, expected_sleeps in [
        (3, 0.0, 3, []),
        (3, 0.01, 4, [0.01]),
        (1, 0.01, 1, [0.01]),  # a call long enough to fill a sample alone: no extra call
    ]:
        calls.clear(), slept.clear()
        _measure._sample(runner, inner, True, settle_s)
        assert (len(calls), slept) == (expected_calls, expected_sleeps)
    slept.clear()
    runners = [_measure.Runner(n, lambda: None) for n in "ab"]
    _measure.measure(runners, budget_s=0.0, rounds=(3, 3), sample_s=0.0, settle_s=0.02)
    assert slept == [0.02] * 6
    configs = [_plan.RunConfig(), _plan.RunConfig(device="gpu"), _plan.RunConfig(smoke=True)]
    assert [c.settle() for c in configs] == [0.01, 0.0, 0.0]


def test_plans_fit_the_device_and_the_mode():
    quick = _plan.plan_cases(_plan.RunConfig(quick=True))
    keys = [(c.op, c.shape, c.dtype, c.pass_) for c in quick]
    assert len(keys) == len(set(keys))
    for shape in _plan.HEADLINE_SHAPES:
        for op in _plan.OPS:
            assert {(shape, op, p) for p in _plan.HEADLINE_PASSES} <= {
                (c.shape, c.op, c.pass_) for c in quick
            }
    assert _plan.RunConfig(quick=True).resolved_sections() == (
        "timing",
        "accuracy",
        "interop",
        "overhead",
        "cross_entropy",
    )
    assert {"plain", "steps"} <= set(_plan.RunConfig().resolved_sections())
    gpu = _plan.plan_cases(_plan.RunConfig(device="gpu", quick=True))
    sweep = {(c.shape[1], c.dtype, c.pass_) for c in gpu if "sweep" in c.suites}
    assert {n for n, _, _ in sweep} == {2**k for k in range(10, 19)}
    assert {(d, p) for _, d, p in sweep} == {
        (d, p) for d in ("float32", "bfloat16") for p in _plan.HEADLINE_PASSES
    }
    assert all(math.prod(c.shape) == _plan.GPU_SWEEP_ELEMENTS for c in gpu if "sweep" in c.suites)


def test_help_imports_neither_jax_nor_torch_and_shows_every_default():
    probe = (
        "import sys, contextlib, io\n"
        "from benchmarks import __main__ as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "print('jax' in sys.modules, 'torch' in sys.modules)\n"
        "import benchmarks._sections\n"  # the probe sees them once they are imported
        "print('jax' in sys.modules, 'torch' in sys.modules)\n"
        "print(text.getvalue())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    before, after, *help_lines = done.stdout.splitlines()
    assert (before, after) == ("False False", "True False")
    text = " ".join(" ".join(help_lines).split())
    for default in (
        "(default: cpu)",
        "(default: bench-results)",
        "(default: 0)",
        "(default: none)",
        "(default: 0.25 quick, 1 full)",
    ):
        assert default in text


@pytest.mark.parametrize(
    ("only", "ops", "sections"),
    [
        ("softmax,log_softmax", _plan.OPS, ("timing",)),
        ("log_softmax,plain", ("log_softmax",), ("plain", "timing")),
        ("plain,steps", _plan.OPS, ("plain", "steps")),
    ],
)
def test_only_selects_ops_and_sections(only, ops, sections):
    config, _ = cli.config_from_args(["--only", only])
    assert (config.ops, config.resolved_sections()) == (ops, sections)


def test_device_gpu_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():  # a GPU machine: the same call finds it
        assert _contenders.make_target("gpu", True).gpu
    else:
        with pytest.raises(RuntimeError, match="--device gpu expected a CUDA GPU"):
            _contenders.make_target("gpu", True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "f64"], "--dtype expected a comma list of"),
        (["--shapes", "12xfoo"], "--shapes expected sizes like 4096x4096"),
        (["--only", "everything"], "--only expected a comma list of"),
        (["--contenders", "numpy"], "--contenders expected a comma list of"),
        (["--budget", "0"], "--budget expected a positive number of seconds"),
        (["--settle", "-1"], "--settle expected seconds from 0 to 1"),
        (["--shapes", "8x8", "--axis", "2"], "--axis expected a valid axis"),
    ],
)
def test_cli_rejects_bad_arguments_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.config_from_args(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_compare_api_and_doctests():
    report = benchmarks.compare(
        shapes=[(64, 4096)], passes=("fwd",), contenders=("jsoftmax", "jax.nn"), budget_s=0.001
    )
    (entry,) = report["headline"]
    assert (entry["op"], entry["pass"], entry["cases"]) == ("softmax", "fwd", 1)
    assert "softmax" in benchmarks.format_headline(report)
    attempted = 0
    for module in (_plan, _measure, _report, _sections, _contenders):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 10
    json.loads(_report.dump_json({"rows": [{"x": math.inf}]}))  # strict JSON: inf as a string
