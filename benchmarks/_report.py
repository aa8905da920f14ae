"""Derived figures (ratios, % of copy, headline) and the report's files: markdown, JSON, CSV."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._config import (
    CONTENDERS,
    COPY_ROWS,
    DTYPE_SHORT,
    HEADLINE_DTYPE,
    HEADLINE_PASSES,
    HEADLINE_SHAPES,
    OPS,
    PASSES,
    RunConfig,
    shape_label,
)
from ._environment import describe_kernel, format_environment

CSV_COLUMNS = (
    "op",
    "shape",
    "axis",
    "row_length",
    "dtype",
    "pass",
    "contender",
    "median_s",
    "p20_s",
    "p80_s",
    "rounds",
    "inner",
    "gbps",
    "copy_gbps",
    "pct_of_copy",
    "best_other",
    "ratio_to_best_other",
    "first_call_s",
    "compile_s",
    "peak_extra_bytes",
    "model_bytes",
    "suites",
)


def _case_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["op"], tuple(row["shape"]), row["axis"], row["dtype"], row["pass"])


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean (nan for no values).

    >>> round(geometric_mean([0.5, 2.0, 1.0]), 6)
    1.0
    """
    logs = [math.log(value) for value in values]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def annotate_rows(rows: list[dict[str, Any]]) -> None:
    """Adds ``best_other``, ``ratio_to_best_other``, ``copy_gbps`` and ``pct_of_copy`` in place.

    The ratio compares a contender with the fastest *other* contender of the same case (copy
    rows excluded); the copy bandwidth of a (shape, dtype) is the faster of its two copy rows.

    >>> rows = [
    ...     {"op": "softmax", "shape": [2, 8], "axis": 1, "dtype": "float32", "pass": "fwd",
    ...      "contender": name, "median_s": seconds, "gbps": gbps}
    ...     for name, seconds, gbps in [("jsoftmax", 2.0, 1.0), ("torch", 1.0, 2.0),
    ...                                 ("copy:torch", 0.5, 4.0)]]
    >>> annotate_rows(rows)
    >>> rows[0]["best_other"], rows[0]["ratio_to_best_other"], rows[0]["pct_of_copy"]
    ('torch', 2.0, 25.0)
    """
    by_case: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    copy_gbps: dict[tuple[Any, ...], float] = {}
    for row in rows:
        by_case[_case_key(row)].append(row)
        if row["contender"] in COPY_ROWS:
            key = (tuple(row["shape"]), row["dtype"])
            copy_gbps[key] = max(copy_gbps.get(key, 0.0), row["gbps"])
    for case_rows in by_case.values():
        contenders = [row for row in case_rows if row["contender"] not in COPY_ROWS]
        for row in case_rows:
            others = [other for other in contenders if other is not row]
            if others and row["contender"] not in COPY_ROWS:
                best = min(others, key=lambda other: other["median_s"])
                row["best_other"] = best["contender"]
                row["ratio_to_best_other"] = row["median_s"] / best["median_s"]
            else:
                row["best_other"] = None
                row["ratio_to_best_other"] = None
            reference = copy_gbps.get((tuple(row["shape"]), row["dtype"]))
            row["copy_gbps"] = reference
            row["pct_of_copy"] = 100.0 * row["gbps"] / reference if reference else None


def headline_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Geometric-mean time ratio jsoftmax / best other contender over the headline shapes.

    One entry per (op, pass) for float32, last axis; below 1 means jsoftmax is faster. Shapes
    that were not measured are left out and ``shapes_measured`` says how many remain.
    """
    entries = []
    for op in OPS:
        for pass_ in HEADLINE_PASSES:
            per_shape = []
            for shape in HEADLINE_SHAPES:
                matching = [
                    row
                    for row in rows
                    if row["op"] == op
                    and row["pass"] == pass_
                    and row["dtype"] == HEADLINE_DTYPE
                    and tuple(row["shape"]) == shape
                    and row["axis"] == len(shape) - 1
                    and row["contender"] == "jsoftmax"
                    and row.get("ratio_to_best_other") is not None
                ]
                if not matching:
                    continue
                row = matching[0]
                per_shape.append(
                    {
                        "shape": list(shape),
                        "jsoftmax_s": row["median_s"],
                        "best_other": row["best_other"],
                        "best_other_s": row["median_s"] / row["ratio_to_best_other"],
                        "ratio": row["ratio_to_best_other"],
                    }
                )
            if per_shape:
                entries.append(
                    {
                        "op": op,
                        "pass": pass_,
                        "dtype": HEADLINE_DTYPE,
                        "geomean_ratio": geometric_mean(item["ratio"] for item in per_shape),
                        "shapes_measured": len(per_shape),
                        "per_shape": per_shape,
                    }
                )
    return {
        "definition": "geometric mean over the headline shapes of (jsoftmax median time) / "
        "(median time of the fastest other contender); below 1 means jsoftmax is faster",
        "shapes": [list(shape) for shape in HEADLINE_SHAPES],
        "entries": entries,
    }


def ratio_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Geometric-mean ratio jsoftmax / best other per (op, dtype, pass) over every measured case.

    The headline covers five fixed shapes; this covers whatever a run measured (``--shapes``).
    """
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row["contender"] == "jsoftmax" and row.get("ratio_to_best_other") is not None:
            groups[(row["op"], row["dtype"], row["pass"])].append(row["ratio_to_best_other"])
    dtype_order = {"float32": 0, "bfloat16": 1, "float16": 2}
    return [
        {
            "op": op,
            "dtype": dtype,
            "pass": pass_,
            "geomean_ratio": geometric_mean(ratios),
            "cases": len(ratios),
        }
        for (op, dtype, pass_), ratios in sorted(
            groups.items(),
            key=lambda item: (
                OPS.index(item[0][0]),
                dtype_order.get(item[0][1], 9),
                PASSES.index(item[0][2]),
            ),
        )
    ]


def format_ratio_summary(summary: Sequence[dict[str, Any]] | None) -> str:
    if not summary:
        return ""
    body = [
        [
            entry["op"],
            DTYPE_SHORT.get(entry["dtype"], entry["dtype"]),
            entry["pass"],
            f"{entry['geomean_ratio']:.2f}x",
            str(entry["cases"]),
        ]
        for entry in summary
    ]
    return "All measured cases, jsoftmax time / best other contender (geometric mean):\n\n" + (
        _table(["op", "dtype", "pass", "geomean ratio", "cases"], body)
    )


def config_summary(config: RunConfig, target: Any) -> dict[str, Any]:
    return {
        "device": config.device,
        "quick": config.quick,
        "dtypes": list(config.resolved_dtypes()),
        "ops": list(config.ops),
        "passes": list(config.passes),
        "shapes": None if config.shapes is None else [list(shape) for shape in config.shapes],
        "suites": None if config.suites is None else list(config.suites),
        "contenders": list(config.resolved_contenders()),
        "sections": list(config.sections),
        "torch_compile": config.use_torch_compile(),
        "case_budget_s": config.case_budget_s(),
        "rounds": [config.min_rounds(), config.max_rounds()],
        "rotate_bytes": target.rotate_bytes,
        "seed": config.seed,
        "command": config.command,
    }


# --------------------------------------------------------------------------------------------
# formatting


def format_seconds(seconds: float | None) -> str:
    """A time with a unit that keeps 3 significant digits.

    >>> format_seconds(2.5e-5), format_seconds(0.0241), format_seconds(1.5)
    ('25.0 us', '24.1 ms', '1.50 s')
    """
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds >= 1.0:
        value, unit = seconds, "s"
    elif seconds >= 1e-3:
        value, unit = seconds * 1e3, "ms"
    else:
        value, unit = seconds * 1e6, "us"
    return f"{f'{value:#.3g}'.rstrip('.')} {unit}"


def _spread(row: dict[str, Any]) -> str:
    return f"{format_seconds(row['median_s'])} [{format_seconds(row['p20_s'])}, " + (
        f"{format_seconds(row['p80_s'])}]"
    )


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def format_headline(headline: dict[str, Any] | None) -> str:
    if not headline or not headline.get("entries"):
        return "Headline ratios: not measured (no float32 headline shapes in this run)."
    shapes = ", ".join(shape_label(shape) for shape in headline["shapes"])
    lines = [
        f"Headline: jsoftmax time / best other contender, float32, geometric mean over {shapes}"
        " (below 1: jsoftmax is faster)",
        "",
    ]
    body = []
    for entry in headline["entries"]:
        details = "; ".join(
            f"{shape_label(item['shape'])} {item['ratio']:.2f} vs {item['best_other']}"
            for item in entry["per_shape"]
        )
        body.append(
            [
                entry["op"],
                entry["pass"],
                f"**{entry['geomean_ratio']:.2f}x**",
                str(entry["shapes_measured"]),
                details,
            ]
        )
    lines.append(_table(["op", "pass", "geomean ratio", "shapes", "per shape"], body))
    return "\n".join(lines)


def _ordered_contenders(names: Iterable[str]) -> list[str]:
    present = set(names)
    known = [name for name in (*CONTENDERS, *COPY_ROWS) if name in present]
    return known + sorted(present - set(known))


def format_timing_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Per (op, dtype, pass): times with spreads, then bandwidth as GB/s and % of copy."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["dtype"], row["pass"])].append(row)
    sections = []
    dtype_order = {"float32": 0, "bfloat16": 1, "float16": 2}
    for op, dtype, pass_ in sorted(
        groups,
        key=lambda key: (OPS.index(key[0]), dtype_order.get(key[1], 9), PASSES.index(key[2])),
    ):
        group = groups[(op, dtype, pass_)]
        contenders = _ordered_contenders(
            row["contender"] for row in group if row["contender"] not in COPY_ROWS
        )
        cases: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
        for row in group:
            cases.setdefault((tuple(row["shape"]), row["axis"]), {})[row["contender"]] = row
        time_body = []
        bandwidth_body = []
        for (shape, axis), by_name in cases.items():
            label = shape_label(shape, axis)
            jsoftmax_row = by_name.get("jsoftmax")
            ratio = (
                f"{jsoftmax_row['ratio_to_best_other']:.2f} ({jsoftmax_row['best_other']})"
                if jsoftmax_row and jsoftmax_row.get("ratio_to_best_other")
                else "n/a"
            )
            time_body.append(
                [label]
                + [_spread(by_name[name]) if name in by_name else "-" for name in contenders]
                + [ratio]
            )
            copy_gbps = next(
                (row["copy_gbps"] for row in by_name.values() if row.get("copy_gbps")), None
            )
            bandwidth_body.append(
                [label]
                + [
                    (
                        f"{by_name[name]['gbps']:.1f} ({by_name[name]['pct_of_copy']:.0f}%)"
                        if name in by_name and by_name[name].get("pct_of_copy") is not None
                        else (f"{by_name[name]['gbps']:.1f}" if name in by_name else "-")
                    )
                    for name in contenders
                ]
                + [f"{copy_gbps:.1f}" if copy_gbps else "n/a"]
            )
        title = f"### {op} · {dtype} · {pass_}"
        sections.append(
            "\n\n".join(
                [
                    title,
                    "Time per call, median [p20, p80]:",
                    _table(["shape", *contenders, "jsoftmax / best other"], time_body),
                    "Effective bandwidth, GB/s (% of the copy bandwidth measured in the same run):",
                    _table(["shape", *contenders, "copy GB/s"], bandwidth_body),
                ]
            )
        )
    return "\n\n".join(sections)


def format_compile_memory(rows: Sequence[dict[str, Any]]) -> str:
    """Compile time and extra memory for the float32 headline shapes."""
    selected = [
        row
        for row in rows
        if row["dtype"] == HEADLINE_DTYPE
        and tuple(row["shape"]) in HEADLINE_SHAPES
        and row["contender"] not in COPY_ROWS
    ]
    if not selected:
        return ""
    contenders = _ordered_contenders(row["contender"] for row in selected)
    cases: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in selected:
        cases.setdefault((row["op"], row["pass"], tuple(row["shape"])), {})[row["contender"]] = row

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        memory = row.get("peak_extra_bytes")
        memory_text = f"{memory / 2**20:.3g} MiB" if memory is not None else "n/a"
        return f"{row['compile_s']:.2f} s / {memory_text}"

    body = [
        [op, pass_, shape_label(shape)] + [cell(by_name.get(name)) for name in contenders]
        for (op, pass_, shape), by_name in cases.items()
    ]
    return _table(["op", "pass", "shape", *contenders], body)


def _format_error(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.2e}"


def format_accuracy(rows: Sequence[dict[str, Any]] | None) -> str:
    if not rows:
        return ""
    floors = {(row["dtype"], row["op"]): row for row in rows if row["contender"] == "floor"}
    body = []
    for row in rows:
        floor = floors.get((row["dtype"], row["op"]))
        times_floor = "n/a"
        if row["max_rel_error"] is not None and floor and floor["max_rel_error"]:
            times_floor = f"{row['max_rel_error'] / floor['max_rel_error']:.2f}"
        body.append(
            [
                DTYPE_SHORT.get(row["dtype"], row["dtype"]),
                row["op"],
                row["contender"],
                _format_error(row["max_rel_error"]),
                _format_error(row["median_rel_error"]),
                times_floor,
                _format_error(row["grad_normwise_error"]),
                row.get("note", ""),
            ]
        )
    return _table(
        [
            "dtype",
            "op",
            "contender",
            "max rel. error",
            "median rel. error",
            "max / floor",
            "gradient error (normwise)",
            "note",
        ],
        body,
    )


def format_interop(interop: dict[str, Any] | None) -> str:
    if not interop:
        return ""
    if "skipped" in interop:
        return f"Skipped: {interop['skipped']}"
    parts = []
    conversions = [row for row in interop["conversions"] if "median_s" in row]
    if conversions:
        functions = list(dict.fromkeys(row["function"] for row in conversions))
        by_size: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in conversions:
            by_size[row["elements"]][row["function"]] = row
        body = [
            [f"2^{int(math.log2(elements))} ({elements * 4 / 2**20:.3g} MiB)"]
            + [_spread(cells[name]) if name in cells else "-" for name in functions]
            for elements, cells in by_size.items()
        ]
        parts.append("Conversion time per call, float32, median [p20, p80]:")
        parts.append(_table(["elements", *functions], body))
    bridged = [row for row in interop["softmax"] if "median_s" in row]
    if bridged:
        cases: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in bridged:
            cases[(row["op"], tuple(row["shape"]), row["pass"])][row["function"]] = row
        body = []
        for (op, shape, pass_), cells in cases.items():
            interop_row = cells.get("jsoftmax.interop")
            body.append(
                [
                    op,
                    shape_label(shape),
                    pass_,
                    _spread(interop_row) if interop_row else "-",
                    _spread(cells["torch"]) if "torch" in cells else "-",
                    f"{interop_row['ratio_to_torch']:.2f}"
                    if interop_row and interop_row.get("ratio_to_torch")
                    else "n/a",
                ]
            )
        parts.append("jsoftmax.interop on torch tensors against torch, float32:")
        parts.append(
            _table(["op", "shape", "pass", "jsoftmax.interop", "torch", "interop / torch"], body)
        )
    failures = [
        row
        for group in interop.values()
        if isinstance(group, list)
        for row in group
        if row.get("note")
    ]
    for row in failures:
        parts.append(f"- {row['function']} failed: {row['note']}")
    return "\n\n".join(parts)


def format_overhead(rows: Sequence[dict[str, Any]] | None) -> str:
    if not rows:
        return ""
    body = [
        [row["call"], _spread(row) if "median_s" in row else f"failed: {row['note']}"]
        for row in rows
    ]
    return _table(["call (8x128 float32)", "time per call, median [p20, p80]"], body)


def format_cross_entropy(section: dict[str, Any] | None) -> str:
    if not section:
        return ""
    if "skipped" in section:
        return f"Skipped: {section['skipped']}"
    rows = section.get("timings", [])
    if not rows:
        return "No cross-entropy timings."
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    cases: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        cases[(tuple(row["shape"]), row["dtype"], row["pass"])][row["contender"]] = row
    body = [
        [shape_label(shape), DTYPE_SHORT.get(dtype, dtype), pass_]
        + [_spread(cells[name]) if name in cells else "-" for name in contenders]
        for (shape, dtype, pass_), cells in cases.items()
    ]
    text = _table(["logits", "dtype", "pass", *contenders], body)
    accuracy = section.get("accuracy", [])
    if accuracy:
        text += "\n\nLoss relative error against float64:\n\n" + _table(
            ["contender", "dtype", "relative error"],
            [[row["contender"], row["dtype"], _format_error(row["rel_error"])] for row in accuracy],
        )
    return text


def busy_machine_warning(environment: dict[str, Any]) -> str | None:
    """A warning when other processes kept the CPU busy during the run, else None.

    >>> busy_machine_warning({"usable_cores": 2, "load_average_start": [3.1, 2.0, 1.0],
    ...                       "load_average_end": [0.2, 0.5, 1.0]})[:37]
    'Warning: load average 3.1 on 2 cores:'
    """
    cores = environment.get("usable_cores") or 1
    start = (environment.get("load_average_start") or [0.0])[0]
    # The run itself keeps up to all usable cores busy: only load beyond that is someone else's.
    end = (environment.get("load_average_end") or [0.0])[0]
    if start < 0.5 * cores and end < cores + 0.5:
        return None
    busiest = max(start, end)
    return (
        f"Warning: load average {busiest:.1f} on {cores} cores: other processes shared the "
        "CPU during this run. Spreads widen, and torch's multi-threaded calls can stall for a "
        "scheduler tick (milliseconds) when a core it waits for is busy; small-shape timings "
        "are then unreliable. Re-run on a quiet machine for figures to quote."
    )


def format_report(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole report as markdown (also what the command prints at the end)."""
    config = report["config"]
    mode = "quick" if config["quick"] else "full"
    parts = [
        "# jsoftmax benchmark report",
        format_environment(report["environment"]),
        f"Run: {mode}, device {config['device']}, dtypes {', '.join(config['dtypes'])}, "
        f"contenders {', '.join(config['contenders'])}; per case about "
        f"{config['case_budget_s']} s of samples, {config['rounds'][0]}-{config['rounds'][1]} "
        f"interleaved rounds; inputs rotated over {config['rotate_bytes'] / 2**20:.0f} MiB; "
        f"took {report.get('elapsed_s', 0):.0f} s."
        + (f" Command: `{config['command']}`." if config.get("command") else "")
        + "".join(
            f" Merged with the run of {part['date_utc']} (`{part['command']}`)."
            for part in report.get("merged_from", [])
        ),
        "## Headline",
        format_headline(report.get("headline")),
        format_ratio_summary(report.get("ratio_summary")),
    ]
    notes = list(report.get("notes", []))
    busy = busy_machine_warning(report["environment"])
    if busy:
        notes.insert(0, busy)
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    if report.get("timings"):
        parts += [
            "## Timings",
            "Compilation and warm-up excluded. Bandwidth counts the bytes a pass must move: "
            "forward 2 x size, backward 3 x size, forward+backward 5 x size. JAX contenders run "
            "under jax.jit (jnp-naive runs op by op, unfused); torch runs eagerly or under "
            "torch.compile on the same thread count.",
            format_timing_tables(report["timings"]),
        ]
        compile_memory = format_compile_memory(report["timings"])
        if compile_memory:
            parts += [
                "## Compile time and memory (float32 headline shapes)",
                "Compile: first call minus a steady call. Memory: the outputs and temporaries one "
                "call adds, from XLA's memory analysis of the compiled call (JAX) or the CUDA "
                "allocator's peak (torch on GPU); n/a where not measurable (eager JAX, torch on "
                "CPU).",
                compile_memory,
            ]
    if report.get("accuracy"):
        shape = report.get("accuracy_shape")
        parts += [
            "## Accuracy",
            f"Against a float64 reference on the dtype-rounded input ({shape_label(shape or [])}"
            ", logits ~ N(0, 3^2)); floor: the float64 result rounded once to the dtype.",
            format_accuracy(report["accuracy"]),
        ]
    if report.get("interop"):
        parts += ["## Interop", format_interop(report["interop"])]
    if report.get("overhead"):
        parts += ["## Per-call overhead", format_overhead(report["overhead"])]
    if report.get("cross_entropy"):
        parts += ["## Cross-entropy", format_cross_entropy(report["cross_entropy"])]
    if plots:
        parts += ["## Plots", "\n".join(f"![{name}]({name})" for name in plots)]
    return "\n\n".join(part for part in parts if part) + "\n"


def write_outputs(
    report: dict[str, Any], out_dir: Path, *, plots: bool = True, keep_samples: bool = False
) -> dict[str, Path]:
    """Writes report.md, results.json, timings.csv, accuracy.csv and the plots into ``out_dir``.

    Everything is written from the report rounded to 4 significant digits (see :func:`rounded`).
    """
    report = rounded(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_names: list[str] = []
    if plots:
        from ._plots import write_plots

        for path in write_plots(report, out_dir):
            written[path.name] = path
            plot_names.append(path.name)
    stored = dict(report)
    if not keep_samples:
        stored["timings"] = [
            {key: value for key, value in row.items() if key != "samples_s"}
            for row in report.get("timings", [])
        ]
    json_path = out_dir / "results.json"
    json_path.write_text(dump_json(stored))
    written["results.json"] = json_path
    csv_path = out_dir / "timings.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report.get("timings", []):
            writer.writerow(
                rounded(
                    {
                        **row,
                        "shape": "x".join(str(dim) for dim in row["shape"]),
                        "suites": "+".join(row["suites"]),
                    }
                )
            )
    written["timings.csv"] = csv_path
    if report.get("accuracy"):
        accuracy_path = out_dir / "accuracy.csv"
        with accuracy_path.open("w", newline="") as handle:
            columns = list(report["accuracy"][0])
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rounded(row) for row in report["accuracy"])
        written["accuracy.csv"] = accuracy_path
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(format_report(report, plot_names))
    written["report.md"] = markdown_path
    return written


SIGNIFICANT_DIGITS = 4


def rounded(value: Any) -> Any:
    """Floats cut to 4 significant digits (far below run-to-run noise), recursively.

    The figures are kept and shown at this precision everywhere (report.md, JSON, CSV,
    RESULTS.md), so that they agree to the last printed digit.

    >>> rounded({"median_s": 0.024137219, "shape": [64, 4096], "gbps": [1.0, 123456.7]})
    {'median_s': 0.02414, 'shape': [64, 4096], 'gbps': [1.0, 123500.0]}
    """
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    return value


def dump_json(report: dict[str, Any]) -> str:
    """The report as JSON: rounded figures, tables one row per line (small and diffable).

    A list of rows that all have the same keys is written as a table,
    ``{"columns": [...], "rows": [[...], ...]}``; :func:`load_report` turns it back.

    >>> print(dump_json({"schema": 1, "timings": [{"a": 1.0, "b": "x"}, {"a": 2.5, "b": "y"}]}))
    {
     "schema": 1,
     "timings": {"columns": ["a", "b"], "rows": [
      [1.0, "x"],
      [2.5, "y"]
     ]}
    }
    """
    data = _finite(rounded(report))
    lines = ["{"]
    for index, (key, value) in enumerate(data.items()):
        comma = "," if index < len(data) - 1 else ""
        head = f" {json.dumps(key)}: "
        if _is_table(value):
            columns = list(value[0])
            rows = [
                f"  {json.dumps([row[column] for column in columns], default=_json_default)}"
                for row in value
            ]
            lines += [
                head + f'{{"columns": {json.dumps(columns)}, "rows": [',
                ",\n".join(rows),
                f" ]}}{comma}",
            ]
        else:
            lines.append(head + json.dumps(value, default=_json_default) + comma)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    if not isinstance(value, list) or len(value) < 2:
        return False
    if not all(isinstance(row, dict) for row in value):
        return False
    return all(list(row) == list(value[0]) for row in value)


def load_report(path: Path) -> dict[str, Any]:
    """A ``results.json`` as the dict :func:`benchmarks.run` returned (tables as lists of rows).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "results.json"
    ...     _ = path.write_text(dump_json({"timings": [{"a": 1.0}, {"a": 2.0}], "notes": []}))
    ...     load_report(path)
    {'timings': [{'a': 1.0}, {'a': 2.0}], 'notes': []}
    """
    data = json.loads(path.read_text())
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"columns", "rows"}:
            data[key] = [dict(zip(value["columns"], row, strict=True)) for row in value["rows"]]
    return data


def _finite(value: Any) -> Any:
    """Strict JSON has no inf or NaN: they are written as the strings "inf", "-inf", "nan".

    >>> _finite({"error": [1.0, float("inf")]})
    {'error': [1.0, 'inf']}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def merge_reports(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One report from two runs on the same machine: for a run split into parts.

    Timing rows are keyed by case and contender, and the new run's row wins; ratios, % of copy,
    the headline and the summary are then derived again over the union. Other sections come from
    the new run when it has them. The earlier parts' dates and commands are listed in
    ``merged_from``.

    >>> row = {"op": "softmax", "shape": [8, 8], "axis": 1, "dtype": "float32",
    ...        "pass": "fwd", "contender": "jsoftmax", "median_s": 1.0, "gbps": 1.0}
    >>> old = {"environment": {"date_utc": "d1"}, "config": {"command": "c1"},
    ...        "timings": [row, {**row, "contender": "torch", "median_s": 2.0}], "notes": []}
    >>> new = {"environment": {"date_utc": "d2"}, "config": {"command": "c2"},
    ...        "timings": [{**row, "median_s": 4.0}], "notes": []}
    >>> merged = merge_reports(old, new)
    >>> [(r["contender"], r["median_s"]) for r in merged["timings"]], merged["merged_from"]
    ([('jsoftmax', 4.0), ('torch', 2.0)], [{'date_utc': 'd1', 'command': 'c1'}])
    """
    merged = dict(previous)
    merged.update({key: value for key, value in new.items() if value not in (None, [], {})})
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in [*previous.get("timings", []), *new.get("timings", [])]:
        key = (*_case_key(row), row["contender"])
        by_key[key] = dict(row)
    rows = list(by_key.values())
    annotate_rows(rows)
    merged["timings"] = rows
    merged["headline"] = headline_ratios(rows)
    merged["ratio_summary"] = ratio_summary(rows)
    merged["notes"] = list(dict.fromkeys([*previous.get("notes", []), *new.get("notes", [])]))
    merged["merged_from"] = [
        *previous.get("merged_from", []),
        {
            "date_utc": previous["environment"].get("date_utc"),
            "command": previous.get("config", {}).get("command"),
        },
    ]
    if previous.get("elapsed_s") is not None and new.get("elapsed_s") is not None:
        merged["elapsed_s"] = previous["elapsed_s"] + new["elapsed_s"]
    return merged


def render_results_md(results_root: Path, relative_to: Path) -> str:
    """RESULTS.md: for each committed run under ``results_root`` (one folder per device), its
    machine, date, command, headline ratios, plots and a link to its full report.

    Paths in the page are relative to ``relative_to`` (the folder RESULTS.md lives in).
    """
    parts = [
        "# Benchmark results",
        "How jsoftmax compares with jax.nn, a naive jnp formula, torch and torch.compile on the "
        "machines below. Generated by `python -m benchmarks --render-results` from the runs "
        "committed under `benchmarks/results/<device>/`; refresh a run with the command quoted "
        "in its section, then re-render. Method: [NOTES.md](NOTES.md).",
    ]
    devices = sorted(path.parent for path in results_root.glob("*/results.json"))
    for folder in devices:
        report = load_report(folder / "results.json")
        environment = report["environment"]
        config = report["config"]
        link = folder.relative_to(relative_to).as_posix()
        hardware = environment["cpu_model"] + f", {environment['usable_cores']} cores"
        if environment.get("gpu_name"):
            hardware = f"{environment['gpu_name']} (host: {hardware})"
        parts += [
            f"## {config['device'].upper()}: {hardware}",
            f"Taken {environment['date_utc']} with jax {environment['jax']}, torch "
            f"{environment.get('torch')}, jsoftmax at {environment.get('git_revision') or '?'}; "
            f"{'quick' if config['quick'] else 'full'} run, {report.get('elapsed_s', 0):.0f} s. "
            f"Command: `{config.get('command') or 'python -m benchmarks'}`. jsoftmax's CPU "
            f"kernels: {describe_kernel(environment.get('jsoftmax_cpu_kernel'))}.",
        ]
        busy = busy_machine_warning(environment)
        if busy:
            parts.append(busy)
        parts += [
            format_headline(report.get("headline")),
            format_ratio_summary(report.get("ratio_summary")),
        ]
        plots = sorted(path.name for path in folder.glob("*.png"))
        parts += [f"![{name}]({link}/{name})" for name in plots]
        parts.append(
            f"Every figure: [{link}/report.md]({link}/report.md) (tables), "
            f"[results.json]({link}/results.json), [timings.csv]({link}/timings.csv)."
        )
    if not devices:
        parts.append("No runs committed yet.")
    if not any(folder.name == "gpu" for folder in devices):
        parts += [
            "## GPU",
            "Not measured yet: no session so far had the lent GPU machine. On one, run "
            "`python -m benchmarks --device gpu --quick --out benchmarks/results/gpu`, add parts "
            "of the full set with `--suites ... --merge` (see NOTES.md), then "
            "`python -m benchmarks --render-results`.",
        ]
    return "\n\n".join(part for part in parts if part) + "\n"
