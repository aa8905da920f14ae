"""PNG plots of a report: bandwidth against row length, accuracy per dtype, conversion time."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported

import matplotlib.pyplot as plt

from ._config import CONTENDERS, COPY_ROWS, DTYPE_SHORT, PASSES

# One colour per contender across every plot.
COLOURS = {
    "jsoftmax": "#d62728",
    "jax.nn": "#1f77b4",
    "jnp-naive": "#9467bd",
    "xla-fused": "#17becf",
    "torch": "#ff7f0e",
    "torch.compile": "#2ca02c",
}
SWEEP_ROWS = 4096


def _sweep_rows(report: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    """Softmax rows of the 4096 x N sweep (any 2-D 4096-row shape over the last axis)."""
    return [
        row
        for row in report.get("timings", [])
        if row["op"] == "softmax"
        and row["dtype"] == dtype
        and len(row["shape"]) == 2
        and row["shape"][0] == SWEEP_ROWS
        and row["axis"] == 1
    ]


def plot_bandwidth(report: dict[str, Any], dtype: str, path: Path) -> bool:
    """Effective GB/s against row length per contender and pass, with the copy bandwidth."""
    rows = _sweep_rows(report, dtype)
    passes = [pass_ for pass_ in PASSES if any(row["pass"] == pass_ for row in rows)]
    row_lengths = {row["row_length"] for row in rows}
    if not passes or len(row_lengths) < 2:
        return False
    copy_by_length: dict[int, float] = {}
    for row in rows:
        if row.get("copy_gbps"):
            copy_by_length[row["row_length"]] = row["copy_gbps"]
    figure, axes = plt.subplots(
        1, len(passes), figsize=(5.2 * len(passes), 4.2), squeeze=False, sharey=True
    )
    for axis, pass_ in zip(axes[0], passes, strict=True):
        series: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row["pass"] == pass_ and row["contender"] not in COPY_ROWS:
                series[row["contender"]].append(row)
        for name in [name for name in CONTENDERS if name in series] + sorted(
            set(series) - set(CONTENDERS)
        ):
            points = sorted(series[name], key=lambda row: row["row_length"])
            lengths = [row["row_length"] for row in points]
            gbps = [row["gbps"] for row in points]
            low = [row["gbps"] - row["gbps_p20"] for row in points]
            high = [row["gbps_p80"] - row["gbps"] for row in points]
            axis.errorbar(
                lengths,
                gbps,
                yerr=[low, high],
                label=name,
                color=COLOURS.get(name),
                marker="o",
                markersize=3.5,
                linewidth=1.6 if name == "jsoftmax" else 1.1,
                capsize=2,
            )
        if copy_by_length:
            lengths = sorted(copy_by_length)
            axis.plot(
                lengths,
                [copy_by_length[length] for length in lengths],
                color="black",
                linestyle="--",
                linewidth=1.2,
                label="copy (same run)",
            )
        axis.set_xscale("log", base=2)
        axis.set_title(f"{pass_}")
        axis.set_xlabel(f"row length N (shape {SWEEP_ROWS} x N)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("effective GB/s (model bytes / median time)")
    axes[0][-1].legend(fontsize=8, loc="best")
    device = report["config"]["device"]
    figure.suptitle(
        f"softmax, {dtype}, {device}: effective bandwidth "
        f"(forward 2x, backward 3x, both 5x the input's bytes); bars: p20-p80"
    )
    figure.tight_layout()
    save_png(figure, path)
    return True


def plot_accuracy(report: dict[str, Any], path: Path) -> bool:
    """Max (bars) and median (dots) relative error per contender and dtype, floor as a line."""
    rows = [row for row in report.get("accuracy") or [] if row["max_rel_error"] is not None]
    if not rows:
        return False
    ops = list(dict.fromkeys(row["op"] for row in rows))
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    contenders = [name for name in CONTENDERS if any(row["contender"] == name for row in rows)]
    figure, axes = plt.subplots(1, len(ops), figsize=(6.4 * len(ops), 4.4), squeeze=False)
    width = 0.8 / max(len(contenders), 1)
    for axis, op in zip(axes[0], ops, strict=True):
        lookup = {(row["dtype"], row["contender"]): row for row in rows if row["op"] == op}
        for position, dtype in enumerate(dtypes):
            floor = lookup.get((dtype, "floor"))
            if floor:
                axis.hlines(
                    floor["max_rel_error"],
                    position - 0.45,
                    position + 0.45,
                    colors="black",
                    linestyles="--",
                    label="floor (max)" if position == 0 else None,
                    zorder=3,
                )
            for index, name in enumerate(contenders):
                row = lookup.get((dtype, name))
                if row is None:
                    continue
                x = position - 0.4 + width * (index + 0.5)
                axis.bar(
                    x,
                    row["max_rel_error"],
                    width=width * 0.9,
                    color=COLOURS.get(name),
                    label=name if position == 0 else None,
                )
                axis.plot(x, row["median_rel_error"], "k.", markersize=4)
        axis.set_yscale("log")
        axis.set_xticks(range(len(dtypes)))
        axis.set_xticklabels([DTYPE_SHORT.get(dtype, dtype) for dtype in dtypes])
        axis.set_title(f"{op}: max relative error (bars), median (dots)")
        axis.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error against float64")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    shape = report.get("accuracy_shape") or []
    figure.suptitle(
        f"accuracy on a {'x'.join(str(dim) for dim in shape)} input; dashed: the rounding floor"
    )
    figure.tight_layout()
    save_png(figure, path)
    return True


def plot_interop(report: dict[str, Any], path: Path) -> bool:
    """Conversion time against tensor size (log-log): zero-copy should be flat."""
    interop = report.get("interop") or {}
    rows = [row for row in interop.get("conversions", []) if "median_s" in row]
    if not rows:
        return False
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(row["function"] for row in rows):
        points = sorted((row for row in rows if row["function"] == name), key=lambda r: r["bytes"])
        axis.plot(
            [row["bytes"] for row in points],
            [row["median_s"] * 1e6 for row in points],
            marker="o",
            linestyle="--" if "copy=True" in name else "-",
            label=name,
        )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("tensor size (bytes, float32)")
    axis.set_ylabel("time per call (us, median)")
    axis.set_title(f"jsoftmax.interop conversions, {report['config']['device']}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, path)
    return True


def save_png(figure: Any, path: Path) -> None:
    """Saves a figure as a small PNG: rendered at 90 dpi, then reduced to a 256-colour palette
    (line plots use few colours; this keeps the committed results a few hundred KB)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png")
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        palette.save(path, optimize=True)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes every plot the report has data for; returns their paths."""
    written = []
    dtypes = list(dict.fromkeys(row["dtype"] for row in report.get("timings", [])))
    for dtype in dtypes:
        path = out_dir / f"bandwidth_{dtype}.png"
        if plot_bandwidth(report, dtype, path):
            written.append(path)
    for name, plot in (("accuracy.png", plot_accuracy), ("interop.png", plot_interop)):
        if plot(report, out_dir / name):
            written.append(out_dir / name)
    return written
