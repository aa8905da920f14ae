"""The machine a run measured, the figures derived from its rows, and its files.

One table formatter, :func:`pivot`, lays out every section: a row per case, a column per
contender, and jsoftmax's ratio to the fastest other contender. Imports nothing heavy.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import resource
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._plan import CONTENDERS, COPIES, HEADLINE_SHAPES, OPS, PASSES, SHORT, shape_label

Row = dict[str, Any]
TITLES = {
    "timing": "Timings",
    "accuracy": "Accuracy",
    "conversion": "Interop: conversions",
    "interop": "Interop: jsoftmax.interop on torch tensors",
    "overhead": "Per-call overhead",
    "cross_entropy": "Cross-entropy",
    "loss_accuracy": "Cross-entropy: the loss's relative error against float64",
    "plain": "Plain harness: one fixed input, medians of 7",
    "steps": "Jitted steps",
}


def _proc(path: str, key: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def describe(device: str, malloc: str) -> dict[str, Any]:
    """Everything about the machine and software worth recording next to a figure."""
    import jax
    import numpy as np

    import jsoftmax

    git = ["git", "describe", "--always", "--dirty"]
    try:
        revision = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True)
    except OSError:
        revision = None
    memory = _proc("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": _proc("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_vector_flags": [
            f
            for f in ("avx2", "avx512f", "amx_tile")
            if f in _proc("/proc/cpuinfo", "flags").split()
        ],
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "jsoftmax": jsoftmax.__version__,
        "git_revision": revision and revision.stdout.strip(),
        "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "malloc": malloc,
    }
    kernel_info = getattr(jsoftmax, "cpu_kernel_info", None)  # builds the kernels now, untimed
    info["jsoftmax_cpu_kernel"] = kernel_info() if kernel_info else None
    try:
        import torch
    except ImportError:
        return info
    info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device == "gpu":
        gpu = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": gpu.name,
            "gpu_gib": round(gpu.total_memory / 2**30),
            "cuda": torch.version.cuda,
        }
    return info


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_environment(info: dict[str, Any]) -> str:
    kernel = info.get("jsoftmax_cpu_kernel") or {}
    lines = [
        f"date: {info['date_utc']}; device: {info['device']}",
        f"CPU: {info['cpu']}, {info['usable_cores']} usable cores, {info['memory_gib']} GiB, "
        + (" ".join(info["cpu_vector_flags"]) or "no AVX2"),
        f"GPU: {info['gpu']}, {info['gpu_gib']} GiB, CUDA {info['cuda']}"
        if info.get("gpu")
        else "",
        f"software: Python {info['python']}, jax {info['jax']}, torch {info.get('torch', '-')}, "
        f"numpy {info['numpy']}, jsoftmax {info['jsoftmax']} at {info['git_revision'] or '?'}",
        f"threads: XLA every usable core, torch {info.get('torch_threads', '-')}; "
        f"malloc: {info['malloc']}; XLA_FLAGS={info['XLA_FLAGS'] or '(unset)'}",
        f"jsoftmax CPU kernels: mode {kernel.get('mode', '-')}, "
        f"available {kernel.get('available', '-')}",
        f"load average at start {info['load_average_start']}, "
        f"at end {info.get('load_average_end', '-')}",
    ]
    return "\n".join(f"- {line}" for line in lines if line)


def busy_warning(info: dict[str, Any]) -> str | None:
    """A warning when other processes shared the CPU during the run.

    >>> busy_warning({"usable_cores": 2, "load_average_start": [3.1, 2, 1]})[:30]
    'Warning: load average 3.1 on 2'
    """
    cores = info["usable_cores"]
    start, end = info["load_average_start"][0], info.get("load_average_end", [0])[0]
    if start < 0.5 * cores and end < cores + 0.5:  # the run itself keeps every core busy
        return None
    return (
        f"Warning: load average {max(start, end):.1f} on {cores} cores: other processes shared "
        "the CPU during this run; spreads widen and small-shape timings are unreliable."
    )


def geomean(values: Iterable[float]) -> float:
    """
    >>> round(geomean([0.5, 2.0, 1.0]), 6)
    1.0
    """
    logs = [math.log(v) for v in values]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def annotate(rows: list[Row]) -> None:
    """Adds ``best_other`` and ``ratio_to_best_other`` to every timed contender row and, to
    timing rows, ``copy_gbps`` (the faster copy of the shape and dtype) and ``pct_of_copy``.

    >>> rows = [{"section": "timing", "case": "c", "shape": [2], "dtype": "f", "contender": n,
    ...          "median_s": s, "gbps": b} for n, s, b in [("jsoftmax", 2.0, 1.0),
    ...          ("torch", 1.0, 2.0), ("copy:jax", 0.5, 4.0)]]
    >>> rows.append({"section": "timing", "case": "c", "contender": "jax.nn", "error": "E"})
    >>> annotate(rows)
    >>> rows[0]["best_other"], rows[0]["ratio_to_best_other"], rows[0]["pct_of_copy"]
    ('torch', 2.0, 25.0)
    """
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    copies: dict[tuple[Any, ...], float] = {}
    for row in rows:
        if "median_s" in row and row["contender"] in COPIES:
            key = (tuple(row["shape"]), row["dtype"])
            copies[key] = max(copies.get(key, 0.0), row["gbps"])
        elif "median_s" in row:
            groups[(row["section"], row["case"])].append(row)
    for group in groups.values():
        for row in group:
            best = min(
                (r for r in group if r is not row), key=lambda r: r["median_s"], default=None
            )
            row["best_other"] = best and best["contender"]
            row["ratio_to_best_other"] = best and row["median_s"] / best["median_s"]
            if "gbps" in row:
                row["copy_gbps"] = copies.get((tuple(row["shape"]), row["dtype"]))
                row["pct_of_copy"] = row["copy_gbps"] and 100 * row["gbps"] / row["copy_gbps"]


def summary(rows: list[Row], headline_only: bool) -> list[Row]:
    """jsoftmax's geometric-mean ratio to the fastest other contender per section, op, dtype
    and pass: over the float32 headline shapes, or over every measured case."""
    groups: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        if row["section"] not in ("timing", "plain") or not row.get("ratio_to_best_other"):
            continue
        shape = tuple(row["shape"])
        headline = shape in HEADLINE_SHAPES and row["axis"] == len(shape) - 1
        if row["contender"] == "jsoftmax" and not (headline_only and row["dtype"] != "float32"):
            if headline or not headline_only:
                groups[(row["section"], row["op"], row["dtype"], row["pass"])].append(row)
    rank = {
        name: index for index, name in enumerate(("timing", "plain", *OPS, *SHORT, *PASSES, "grad"))
    }
    return [
        {
            "section": key[0],
            "op": key[1],
            "dtype": key[2],
            "pass": key[3],
            "geomean_ratio": geomean(row["ratio_to_best_other"] for row in groups[key]),
            "cases": len(groups[key]),
            "per_case": "; ".join(
                f"{shape_label(r['shape'])} {r['ratio_to_best_other']:.2f} vs {r['best_other']}"
                for r in groups[key]
            ),
        }
        for key in sorted(groups, key=lambda key: [rank[part] for part in key])
    ]


def seconds(value: float) -> str:
    """
    >>> seconds(2.5e-5), seconds(0.0241), seconds(1.5)
    ('25.0 us', '24.1 ms', '1.50 s')
    """
    scaled, unit = (
        (value, "s")
        if value >= 1
        else (value * 1e3, "ms")
        if value >= 1e-3
        else (value * 1e6, "us")
    )
    return f"{f'{scaled:#.3g}'.rstrip('.')} {unit}"


def spread(row: Row) -> str:
    return f"{seconds(row['median_s'])} [{seconds(row['p20_s'])}, {seconds(row['p80_s'])}]"


def markdown_table(header: list[str], body: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def pivot(rows: list[Row], cell: Callable[[Row], str], ratio: bool = True) -> str:
    """A row per case, a column per contender; ``cell`` formats a measured row, a failed one
    reads "failed", a missing one "-"; with ``ratio``, jsoftmax's time over the best other's.

    >>> rows = [{"case": "a", "contender": "torch", "x": 1},
    ...         {"case": "a", "contender": "jsoftmax", "error": "E"}]
    >>> print(pivot(rows, lambda row: str(row["x"])))
    | case | jsoftmax | torch | jsoftmax / best other |
    |---|---|---|---|
    | a | failed | 1 | n/a |
    """
    present = set(row["contender"] for row in rows)
    known = [name for name in (*CONTENDERS, *COPIES) if name in present]
    names = known + [
        name for name in dict.fromkeys(r["contender"] for r in rows) if name not in known
    ]
    cases: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        cases[row["case"]][row["contender"]] = row
    ratio = ratio and "jsoftmax" in names
    body = []
    for case, by_name in cases.items():
        cells = [case] + [
            "-" if n not in by_name else "failed" if "error" in by_name[n] else cell(by_name[n])
            for n in names
        ]
        mine = by_name.get("jsoftmax", {})
        best = (
            f"{mine['ratio_to_best_other']:.2f} ({mine['best_other']})"
            if mine.get("ratio_to_best_other")
            else "n/a"
        )
        body.append(cells + [best] * ratio)
    return markdown_table(["case", *names] + ["jsoftmax / best other"] * ratio, body)


def _bandwidth(row: Row) -> str:
    share = row.get("pct_of_copy") and row["contender"] not in COPIES
    return f"{row['gbps']:.1f}" + (f" ({row['pct_of_copy']:.0f}%)" if share else "")


def _compile(row: Row) -> str:
    memory = row.get("peak_extra_bytes")
    return f"{row['compile_s']:.2f} s" + (f" / {memory / 2**20:.3g} MiB" if memory else "")


def format_section(section: str, rows: list[Row]) -> str:
    if section == "timing":
        headline = [
            r for r in rows if tuple(r["shape"]) in HEADLINE_SHAPES and r["dtype"] == "float32"
        ]
        return "\n\n".join(
            [
                "Time per call, median [p20, p80]; JAX contenders under jax.jit (jnp-naive op by "
                "op), "
                "torch eager or compiled; compilation and warm-up excluded:",
                pivot(rows, spread),
                "Effective bandwidth, GB/s (the bytes a pass must move: forward 2x the input, "
                "backward "
                "3x, both 5x), and % of the copy bandwidth measured in the same run:",
                pivot(rows, _bandwidth, ratio=False),
                "First call beyond a steady one (compilation), and for jitted JAX the memory a "
                "call "
                "adds (XLA's memory analysis), float32 headline shapes:",
                pivot([r for r in headline if r["contender"] not in COPIES], _compile, ratio=False),
            ]
        )
    if section == "accuracy":
        floors = {row["case"]: row["max_rel_error"] for row in rows if row["contender"] == "floor"}

        def times_floor(row: Row) -> str:
            return f"{row['max_rel_error']:.2e} ({row['max_rel_error'] / floors[row['case']]:.2f}x)"

        return "\n\n".join(
            [
                f"Against a float64 reference computed from the dtype-rounded input "
                f"({shape_label(rows[0]['shape'])}, logits ~ N(0, 3^2)); floor: the float64 result "
                "rounded once to the dtype, the best possible. Max elementwise relative error "
                "(x floor):",
                pivot(rows, times_floor, ratio=False),
                "Gradient, normwise relative error:",
                pivot(rows, lambda row: f"{row['grad_error']:.2e}", ratio=False),
            ]
        )
    if section == "loss_accuracy":
        return pivot(rows, lambda row: f"{row['rel_error']:.2e}", ratio=False)
    return "Median [p20, p80]:\n\n" + pivot(rows, spread)


def format_headline(report: dict[str, Any]) -> str:
    """The geomean tables: the float32 headline shapes, then every measured case."""

    def table(entries: list[Row], details: bool) -> str:
        header = ["section", "op", "dtype", "pass", "geomean ratio", "cases"] + [
            "per case"
        ] * details
        return markdown_table(
            header,
            (
                [
                    e["section"],
                    e["op"],
                    SHORT[e["dtype"]],
                    e["pass"],
                    f"**{e['geomean_ratio']:.2f}x**",
                    str(e["cases"]),
                ]
                + [e["per_case"]] * details
                for e in entries
            ),
        )

    if not report.get("summary"):
        return "Not measured in this run (no jsoftmax timings)."
    shapes = ", ".join(map(shape_label, HEADLINE_SHAPES))
    return (
        "jsoftmax time / fastest other contender, geometric mean over the float32 shapes "
        f"{shapes} (below 1: jsoftmax is faster):\n\n"
        + (table(report["headline"], True) if report.get("headline") else "(none measured)")
        + "\n\nEvery measured case:\n\n"
        + table(report["summary"], False)
    )


def took(report: dict[str, Any]) -> str:
    if "elapsed_s" not in report:
        return "still running when this was written"
    memory = report["peak_rss_bytes"] / 2**30
    return f"took {report['elapsed_s']:.0f} s, " + (
        f"peak memory {memory:.2f} GiB" if memory else "peak memory not recorded"
    )


def format_report(report: dict[str, Any], plots: Iterable[str] = ()) -> str:
    parts = [
        "# jsoftmax benchmark report",
        format_environment(report["environment"]),
        f"`{report['config']['command']}`: {took(report)}.",
        "## Headline",
        format_headline(report),
    ]
    notes = [busy_warning(report["environment"]), *report["notes"], *report.get("merged_from", [])]
    notes += [
        f"{r['case']}: {r['contender']} failed: {r['error']}"
        for r in report["rows"]
        if "error" in r
    ]
    if any(notes):
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes if note)]
    by_section: dict[str, list[Row]] = defaultdict(list)
    for row in report["rows"]:
        by_section[row["section"]].append(row)
    for section, rows in by_section.items():
        if any("error" not in row for row in rows):
            parts += [f"## {TITLES[section]}", format_section(section, rows)]
    if plots:
        parts += ["## Plots", "\n".join(f"![{name}]({name})" for name in plots)]
    return "\n\n".join(parts) + "\n"


def dump_json(report: dict[str, Any]) -> str:
    """JSON with one row per line (small, diffable), 4 significant digits, inf as a string.

    >>> print(dump_json({"rows": [{"a": 1.23456}, {"a": float("inf")}], "n": 2}))
    {
    "rows": [
    {"a": 1.235},
    {"a": "inf"}
    ],
    "n": 2
    }
    """

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.4g}") if math.isfinite(value) else str(value)
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        return [clean(item) for item in value] if isinstance(value, (list, tuple)) else value

    lines = []
    for key, value in clean(report).items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{json.dumps(key)}: [\n" + ",\n".join(map(json.dumps, value)) + "\n]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_outputs(report: dict[str, Any], out: Path, plots: Iterable[str] = ()) -> list[str]:
    """Writes results.json, a CSV per section and report.md, all from the stored figures."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dump_json(report))
    stored = load_report(out / "results.json")
    by_section: dict[str, list[Row]] = defaultdict(list)
    for row in stored["rows"]:
        by_section[row["section"]].append(row)
    for section, rows in by_section.items():
        columns = list(dict.fromkeys(key for row in rows for key in row if key != "samples_s"))
        with (out / f"{section}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(
                {k: "x".join(map(str, v)) if k == "shape" else v for k, v in row.items()}
                for row in rows
            )
    (out / "report.md").write_text(format_report(stored, plots))
    return ["results.json", *(f"{section}.csv" for section in by_section), "report.md"]


def merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One report from a run split into parts: for the same case and contender the new row
    wins; ratios and geomeans are derived again over the union."""
    rows = {(r["section"], r["case"], r["contender"]): r for r in previous["rows"] + new["rows"]}
    merged = {**new, "rows": list(rows.values())}
    merged["merged_from"] = [
        *previous.get("merged_from", []),
        f"merged with `{previous['config']['command']}`",
    ]
    merged["elapsed_s"] = previous.get("elapsed_s", 0) + new.get("elapsed_s", 0)
    annotate(merged["rows"])
    merged["headline"], merged["summary"] = (
        summary(merged["rows"], True),
        summary(merged["rows"], False),
    )
    return merged


def render_results(root: Path) -> str:
    """RESULTS.md from the runs under ``root/results/<device>/``: machine, date, command,
    headline and plots of each, with links to the full report."""
    parts = [
        "# Benchmark results",
        "How jsoftmax compares with jax.nn, a naive jnp formula, torch and torch.compile, per "
        "machine. Generated by `python -m benchmarks --render-results` from the runs committed "
        "under `benchmarks/results/<device>/`. Method and history: [NOTES.md](NOTES.md).",
    ]
    for folder in sorted(path.parent for path in root.glob("results/*/results.json")):
        report, link = load_report(folder / "results.json"), folder.relative_to(root).as_posix()
        info = report["environment"]
        host = f"{info['cpu']}, {info['usable_cores']} cores"
        parts += [
            f"## {info['device'].upper()}: "
            + (f"{info['gpu']} (host {host})" if info.get("gpu") else host),
            f"Taken {info['date_utc']} with jax {info['jax']}, torch {info.get('torch')}, jsoftmax "
            f"at {info['git_revision']}: `{report['config']['command']}` {took(report)}.",
            busy_warning(info) or "",
            format_headline(report),
            *(f"![{path.name}]({link}/{path.name})" for path in sorted(folder.glob("*.png"))),
            f"Every figure: [{link}/report.md]({link}/report.md), "
            f"[{link}/results.json]({link}/results.json).",
        ]
    return "\n\n".join(part for part in parts if part) + "\n"
