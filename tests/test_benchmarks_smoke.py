"""The benchmark harness: a tiny sweep end to end, and the pieces its figures are derived from.

No timing assertions: the figures of a 3-round run on tiny inputs mean nothing. What is checked is
that ``python -m benchmarks`` runs every section and writes well-formed outputs, and that the
derived figures (bandwidth, % of copy, ratio to the best other contender, headline geometric
means, the accuracy floor) follow from what was measured.
"""

from __future__ import annotations

import contextlib
import csv
import doctest
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import ref_log_softmax, ref_softmax

import benchmarks
import jsoftmax
from benchmarks import __main__ as cli
from benchmarks import (
    _accuracy,
    _config,
    _contenders,
    _environment,
    _interop,
    _plots,
    _report,
    _timing,
)
from benchmarks._config import RunConfig

SMOKE_ARGS = ["--smoke", "--no-compile"]
# results.json keeps 4 significant digits: figures derived from rounded ones agree to this.
ROUNDED = {"rel": 2e-3}
# Unit roundoff of each dtype: rounding once can err by at most this, relatively.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``python -m benchmarks --smoke`` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    code, stdout, stderr = _run_cli([*SMOKE_ARGS, "--out", str(out)])
    report = _report.load_report(out / "results.json")
    json.loads((out / "results.json").read_text())  # plain JSON for any reader
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "report": report}


def _smoke_config() -> RunConfig:
    config, _ = cli.config_from_args(SMOKE_ARGS)
    return config


# --------------------------------------------------------------------------------------------
# the end-to-end run


def test_run_succeeds_and_prints_machine_progress_and_headline(smoke):
    assert smoke["code"] == 0
    stdout = smoke["stdout"]
    # The machine is described first, the headline comes last.
    assert stdout.index("- CPU:") < stdout.index("## Timings") < stdout.rindex("Headline:")
    assert f"jax {__import__('jax').__version__}" in stdout
    assert f"torch {torch.__version__}" in stdout
    planned = len(_config.plan_cases(_smoke_config()))
    assert f"[{planned}/{planned} " in smoke["stderr"]  # progress reached the last case


def test_output_files_are_written_and_well_formed(smoke):
    out: Path = smoke["out"]
    expected = {"report.md", "results.json", "timings.csv", "accuracy.csv"}
    expected |= {"bandwidth_float32.png", "accuracy.png"}
    interop, _ = _interop.load_interop()
    if interop is not None:
        expected.add("interop.png")
    assert expected <= {path.name for path in out.iterdir()}
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    markdown = (out / "report.md").read_text()
    for heading in ("# jsoftmax benchmark report", "## Headline", "## Accuracy", "## Plots"):
        assert heading in markdown
    for group in ("softmax · float32 · fwd", "softmax · float32 · bwd", "log_softmax · float32"):
        assert group in markdown
    assert "![bandwidth_float32.png](bandwidth_float32.png)" in markdown


def test_environment_is_recorded(smoke):
    environment = smoke["report"]["environment"]
    assert environment["jax"] == __import__("jax").__version__
    assert environment["torch"] == torch.__version__
    assert environment["jsoftmax"] == jsoftmax.__version__
    assert environment["torch_threads"] == _environment.usable_cores()
    assert environment["xla_cpu_threads"] == _environment.usable_cores()
    assert environment["cpu_model"]
    assert environment["date_utc"].endswith("UTC")
    assert len(environment["load_average_end"]) == 3


def test_every_planned_case_has_every_contender_and_a_copy_reference(smoke):
    config = _smoke_config()
    rows = smoke["report"]["timings"]
    measured = {
        (row["op"], tuple(row["shape"]), row["axis"], row["dtype"], row["pass"], row["contender"])
        for row in rows
    }
    for case in _config.plan_cases(config):
        for name in _config.case_contenders(config, case):
            key = (case.op, case.shape, case.axis, case.dtype, case.pass_, name)
            assert key in measured, key
    shapes = {(tuple(row["shape"]), row["dtype"]) for row in rows}
    for shape, dtype in shapes:
        copies = [
            row
            for row in rows
            if tuple(row["shape"]) == shape
            and row["dtype"] == dtype
            and row["contender"] in _config.COPY_ROWS
        ]
        assert sorted(row["contender"] for row in copies) == sorted(_config.COPY_ROWS)


def test_timing_rows_derive_their_figures_from_the_median(smoke):
    rows = smoke["report"]["timings"]
    assert rows
    for row in rows:
        assert 0 < row["p20_s"] <= row["median_s"] <= row["p80_s"]
        assert row["rounds"] == 3
        factor = (
            2 if row["contender"] in _config.COPY_ROWS else _config.MODEL_BYTES_FACTOR[row["pass"]]
        )
        assert row["model_bytes"] == factor * math.prod(row["shape"]) * 4
        assert row["gbps"] == pytest.approx(row["model_bytes"] / row["median_s"] / 1e9, **ROUNDED)
        assert row["gbps_p20"] <= row["gbps"] <= row["gbps_p80"]
        assert row["pct_of_copy"] == pytest.approx(100 * row["gbps"] / row["copy_gbps"], **ROUNDED)
        assert row["first_call_s"] > 0 and row["compile_s"] >= 0


def test_ratio_to_best_other_singles_out_the_fastest(smoke):
    by_case: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in smoke["report"]["timings"]:
        if row["contender"] not in _config.COPY_ROWS:
            key = (row["op"], tuple(row["shape"]), row["dtype"], row["pass"])
            by_case.setdefault(key, []).append(row)
    for rows in by_case.values():
        fastest = min(rows, key=lambda row: row["median_s"])
        for row in rows:
            others = [other["median_s"] for other in rows if other is not row]
            ratio = row["ratio_to_best_other"]
            assert ratio == pytest.approx(row["median_s"] / min(others), **ROUNDED)
            if row is fastest:
                assert ratio <= 1 + ROUNDED["rel"]
            else:
                assert ratio >= 1 - ROUNDED["rel"]
                assert row["best_other"] != row["contender"]


def test_headline_comes_from_the_measured_headline_shape(smoke):
    report = smoke["report"]
    entries = report["headline"]["entries"]
    assert {(entry["op"], entry["pass"]) for entry in entries} == {
        (op, pass_) for op in _config.OPS for pass_ in _config.HEADLINE_PASSES
    }
    for entry in entries:
        assert entry["shapes_measured"] == 1  # only 64x4096 of the five is in the smoke sweep
        (row,) = [
            row
            for row in report["timings"]
            if row["contender"] == "jsoftmax"
            and row["op"] == entry["op"]
            and row["pass"] == entry["pass"]
            and row["shape"] == [64, 4096]
        ]
        assert entry["geomean_ratio"] == pytest.approx(row["ratio_to_best_other"], **ROUNDED)
    assert f"{entries[0]['geomean_ratio']:.2f}x" in smoke["stdout"]


def test_results_page_renders_from_a_run_folder(smoke, tmp_path):
    device_dir = tmp_path / "results" / "cpu"
    device_dir.mkdir(parents=True)
    for path in smoke["out"].iterdir():
        (device_dir / path.name).write_bytes(path.read_bytes())
    page = _report.render_results_md(tmp_path / "results", tmp_path)
    environment = smoke["report"]["environment"]
    assert f"## CPU: {environment['cpu_model']}" in page
    assert environment["date_utc"] in page
    assert "Command: `python -m benchmarks --smoke --no-compile --out " in page
    assert "![bandwidth_float32.png](results/cpu/bandwidth_float32.png)" in page
    assert "[results/cpu/report.md](results/cpu/report.md)" in page
    assert "## GPU" in page and "Not measured yet" in page
    entry = smoke["report"]["headline"]["entries"][0]
    assert f"**{entry['geomean_ratio']:.2f}x**" in page


def test_merge_joins_a_run_split_into_parts(tmp_path):
    part = [*SMOKE_ARGS, "--only", "softmax", "--passes", "fwd", "--out", str(tmp_path)]
    part += ["--contenders", "jsoftmax,jax.nn", "--no-plots"]
    assert _run_cli([*part, "--shapes", "8x64"])[0] == 0
    assert _run_cli([*part, "--shapes", "8x128", "--merge"])[0] == 0
    merged = _report.load_report(tmp_path / "results.json")
    shapes = {tuple(row["shape"]) for row in merged["timings"]}
    assert shapes == {(8, 64), (8, 128)}
    assert len(merged["merged_from"]) == 1
    assert "--shapes 8x64" in merged["merged_from"][0]["command"]
    assert "--shapes 8x128 --merge" in merged["config"]["command"]
    assert len(merged["ratio_summary"]) == 1 and merged["ratio_summary"][0]["cases"] == 2


def test_csv_holds_the_json_rows(smoke):
    with (smoke["out"] / "timings.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    json_rows = smoke["report"]["timings"]
    assert len(csv_rows) == len(json_rows)
    assert tuple(csv_rows[0]) == _report.CSV_COLUMNS
    for csv_row, json_row in zip(csv_rows, json_rows, strict=True):
        assert csv_row["contender"] == json_row["contender"]
        assert csv_row["shape"] == "x".join(str(dim) for dim in json_row["shape"])
        assert float(csv_row["median_s"]) == pytest.approx(json_row["median_s"], **ROUNDED)
    assert "samples_s" not in json_rows[0]  # raw samples only with --samples


def test_accuracy_section_has_a_floor_and_every_contender(smoke):
    rows = smoke["report"]["accuracy"]
    config = _smoke_config()
    for op in _config.OPS:
        names = {row["contender"] for row in rows if row["op"] == op}
        assert names == {"floor", *config.resolved_contenders()}
    for row in rows:
        assert row["max_rel_error"] is not None, row
        assert 0 <= row["median_rel_error"] <= row["max_rel_error"]


def test_interop_section_times_the_bridge_or_says_why_not(smoke):
    section = smoke["report"]["interop"]
    interop, why_not = _interop.load_interop()
    if interop is None:
        assert section == {"skipped": why_not}
        return
    functions = {row["function"] for row in section["conversions"] if "median_s" in row}
    assert functions == {"from_torch", "from_torch(copy=True)", "to_torch", "to_torch(copy=True)"}
    bridged = {(row["op"], row["pass"], row["function"]) for row in section["softmax"]}
    assert ("softmax", "fwd+bwd", "jsoftmax.interop") in bridged
    assert ("log_softmax", "fwd", "torch") in bridged


def test_cross_entropy_section_runs_or_says_why_not(smoke):
    section = smoke["report"]["cross_entropy"]
    if not hasattr(jsoftmax, "cross_entropy"):
        assert "does not exist" in section["skipped"]
        return
    names = {row["contender"] for row in section["timings"] if "median_s" in row}
    assert {"jsoftmax", "jax.nn", "torch"} <= names
    for row in section["accuracy"]:
        assert row["rel_error"] < (1e-5 if row["dtype"] == "float32" else 5e-2), row


def test_overhead_section_times_each_way_of_calling(smoke):
    calls = {row["call"] for row in smoke["report"]["overhead"] if "median_s" in row}
    assert calls == {
        "jsoftmax.softmax(x)",
        "jax.jit(jsoftmax.softmax)(x)",
        "jax.nn.softmax(x)",
        "torch.softmax(x, -1)",
    }


def test_compare_api_returns_the_headline_for_the_lead():
    report = benchmarks.compare(
        shapes=[(64, 4096)],
        passes=("fwd",),
        contenders=("jsoftmax", "jax.nn"),
        budget_s=0.001,
        progress=lambda message: None,
    )
    (entry,) = report["headline"]["entries"]
    assert (entry["op"], entry["pass"], entry["per_shape"][0]["best_other"]) == (
        "softmax",
        "fwd",
        "jax.nn",
    )
    assert [row["contender"] for row in report["timings"]] == [
        "jsoftmax",
        "jax.nn",
        "copy:torch",
        "copy:jax",
    ]
    assert "softmax" in benchmarks.format_headline(report["headline"])


# --------------------------------------------------------------------------------------------
# the pieces


def test_reference_matches_the_test_helpers_and_torch_float64_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 33)) * 4
    cotangent = rng.standard_normal((5, 33))
    for op, helper in (("softmax", ref_softmax), ("log_softmax", ref_log_softmax)):
        out, grad = _accuracy.reference(op, x, cotangent, axis=-1)
        np.testing.assert_allclose(out, helper(x), rtol=1e-13, atol=1e-15)
        x_torch = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y_torch = getattr(torch, op)(x_torch, -1)
        (grad_torch,) = torch.autograd.grad(y_torch, x_torch, torch.tensor(cotangent))
        np.testing.assert_allclose(grad, grad_torch.numpy(), rtol=1e-12, atol=1e-14)


def test_accuracy_floor_is_one_rounding_and_torch_rounds_once():
    target = _contenders.make_target("cpu", None)
    rows = _accuracy.run_accuracy(
        ("jsoftmax", "torch"),
        ("float32", "bfloat16", "float16"),
        (4, 512),
        target,
        seed=0,
        progress=lambda message: None,
    )
    by_key = {(row["dtype"], row["op"], row["contender"]): row for row in rows}
    for dtype, roundoff in UNIT_ROUNDOFF.items():
        for op in _config.OPS:
            floor = by_key[(dtype, op, "floor")]
            assert 0 < floor["max_rel_error"] <= roundoff
            # The harness compares the right arrays: a mismatch would give errors of order 1.
            assert by_key[(dtype, op, "jsoftmax")]["max_rel_error"] < 0.05
    for dtype in ("bfloat16", "float16"):
        # torch computes bf16/f16 softmax in float32 and rounds once: at most a rounding flip
        # away from the floor.
        torch_row = by_key[(dtype, "softmax", "torch")]
        assert torch_row["max_rel_error"] <= 2 * UNIT_ROUNDOFF[dtype]


def test_elementwise_error_skips_subnormal_exact_values_and_flags_nonfinite():
    exact = np.array([1.0, 1e-45, 0.5])
    worst, _ = _accuracy.elementwise_relative_error(np.array([1.0, 0.0, 0.5]), exact, "float32")
    assert worst == 0.0  # 1e-45 is below float32's smallest normal: not scored
    worst, _ = _accuracy.elementwise_relative_error(np.array([1.0, 0.0, np.nan]), exact, "float32")
    assert worst == math.inf


def test_measure_interleaves_rounds_and_reports_failures():
    calls: list[str] = []

    def failing() -> None:
        raise RuntimeError("no kernel for this case")

    runners = [
        _timing.Runner("a", lambda: calls.append("a"), lambda out: None),
        _timing.Runner("broken", failing, lambda out: None),
        _timing.Runner("b", lambda: calls.append("b"), lambda out: None),
    ]
    timings, failures = _timing.measure(
        runners, budget_s=0.0, min_rounds=4, max_rounds=4, target_sample_s=0.0
    )
    assert failures == {"broken": "RuntimeError: no kernel for this case"}
    assert set(timings) == {"a", "b"}
    for timing in timings.values():
        assert timing.inner == 1 and len(timing.per_call_s) == 4
    # After the warm-up, rounds alternate and the starting runner rotates: a b, b a, a b, b a.
    assert calls[-8:] == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_annotate_rows_and_headline_on_known_numbers():
    def row(shape, contender, seconds, pass_="fwd"):
        return {
            "op": "softmax",
            "shape": list(shape),
            "axis": len(shape) - 1,
            "dtype": "float32",
            "pass": pass_,
            "contender": contender,
            "median_s": seconds,
            "gbps": 1.0 / seconds,
        }

    rows = []
    # jsoftmax is 2x slower on one shape, 2x faster on another, equal on a third: geomean 1.
    for shape, mine, theirs in (((4096, 4096), 2.0, 1.0), ((64, 4096), 1.0, 2.0)):
        rows += [row(shape, "jsoftmax", mine), row(shape, "torch", theirs)]
    rows += [row((1024, 4096), "jsoftmax", 3.0), row((1024, 4096), "jax.nn", 3.0)]
    rows += [row((1024, 4096), "copy:torch", 0.5), row((1024, 4096), "copy:jax", 0.25)]
    rows += [
        row((1024, 4096), "jsoftmax", 4.0, "fwd+bwd"),
        row((1024, 4096), "torch", 1.0, "fwd+bwd"),
    ]
    _report.annotate_rows(rows)
    assert rows[6]["ratio_to_best_other"] is None  # copy rows are references, not contenders
    assert rows[4]["pct_of_copy"] == pytest.approx(100 * (1 / 3.0) / 4.0)  # faster copy wins
    headline = _report.headline_ratios(rows)
    by_pass = {entry["pass"]: entry for entry in headline["entries"]}
    assert by_pass["fwd"]["geomean_ratio"] == pytest.approx(1.0)
    assert by_pass["fwd"]["shapes_measured"] == 3
    assert by_pass["fwd+bwd"]["geomean_ratio"] == pytest.approx(4.0)
    summary = {entry["pass"]: entry for entry in _report.ratio_summary(rows)}
    assert summary["fwd"]["cases"] == 3 and summary["fwd+bwd"]["cases"] == 1


def test_plans_deduplicate_and_fit_the_device():
    full_cpu = _config.plan_cases(RunConfig())
    keys = [(c.op, c.shape, c.axis, c.dtype, c.pass_) for c in full_cpu]
    assert len(keys) == len(set(keys))
    (shared,) = [
        case
        for case in full_cpu
        if case.shape == (4096, 4096)
        and (case.op, case.dtype, case.pass_) == ("softmax", "float32", "fwd")
    ]
    assert shared.suites == ("headline", "triton")
    assert max(case.size for case in full_cpu) <= 4096 * 12672  # fits 24 GiB with every pool
    quick = _config.plan_cases(RunConfig(quick=True))
    for shape in _config.HEADLINE_SHAPES:
        for op in _config.OPS:
            for pass_ in _config.HEADLINE_PASSES:
                assert any(
                    (c.shape, c.op, c.pass_, c.dtype) == (shape, op, pass_, "float32")
                    for c in quick
                )
    gpu = RunConfig(device="gpu")
    gpu_cases = _config.plan_cases(gpu)
    assert any(case.shape == (8, 16, 2048, 2048) for case in gpu_cases)
    assert {case.dtype for case in gpu_cases} == {"float32", "bfloat16", "float16"}
    assert "xla-fused" in gpu.resolved_contenders()
    assert "xla-fused" not in RunConfig().resolved_contenders()


def test_cli_list_matches_the_plan():
    code, stdout, _ = _run_cli(["--quick", "--list"])
    assert code == 0
    config, _ = cli.config_from_args(["--quick"])
    assert f"{len(_config.plan_cases(config))} cases" in stdout
    assert "softmax f32 fwd+bwd 4096x4096 [headline]" in stdout


def test_cli_filters_build_the_lead_ab_config():
    config, _ = cli.config_from_args(
        ["--quick", "--only", "softmax", "--shapes", "4096x4096,1024x4096", "--dtype", "f32"]
    )
    assert config.ops == ("softmax",) and config.sections == ("timing",)
    assert config.shapes == ((4096, 4096), (1024, 4096)) and config.dtypes == ("float32",)
    assert config.command == (
        "python -m benchmarks --quick --only softmax --shapes 4096x4096,1024x4096 --dtype f32"
    )
    config, action = cli.config_from_args(["--headline"])
    assert config.suites == ("headline",) and config.passes == _config.HEADLINE_PASSES
    assert action is None
    assert cli.config_from_args(["--render-results"])[1] == "render"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "f64"], "--dtype expected a comma list of"),
        (["--shapes", "12xfoo"], "--shapes expected sizes like 4096x4096"),
        (["--only", "everything"], "--only expected a comma list of"),
        (["--contenders", "numpy"], "--contenders expected a comma list of"),
        (["--budget", "0"], "--budget expected a positive number of seconds"),
        (["--shapes", "8x8", "--axis", "2"], "--axis expected a valid axis"),
    ],
)
def test_cli_rejects_bad_arguments_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.config_from_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_request_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --device gpu would run the benchmark")
    with pytest.raises(_contenders.DeviceUnavailable, match="--device gpu expected a CUDA GPU"):
        _contenders.make_target("gpu", None)


def test_doctests_of_the_benchmark_modules_pass():
    attempted = 0
    for module in (_config, _timing, _report, _accuracy, _contenders):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 10
    assert _plots.COLOURS["jsoftmax"]  # the plotting module imports headless (Agg)
