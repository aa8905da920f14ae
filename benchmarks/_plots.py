"""PNG plots of a report: bandwidth against row length, accuracy per dtype, conversion time."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np

from ._plan import CONTENDERS, COPIES, SHORT

COLOURS = dict(
    zip(CONTENDERS, ("#d62728", "#1f77b4", "#9467bd", "#17becf", "#ff7f0e", "#2ca02c"), strict=True)
)


def _save(figure: Any, path: Path) -> None:
    """A small PNG: 90 dpi, reduced to a 256-colour palette (line plots use few colours)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png", bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )


def bandwidth(rows: list[dict[str, Any]], dtype: str, path: Path) -> bool:
    """Effective GB/s against row length, one panel per pass; the copy reference is the median
    of the copies measured over the sweep, drawn as one horizontal line."""
    sweep = [
        r
        for r in rows
        if r["section"] == "timing"
        and "sweep" in r["suites"]
        and r["dtype"] == dtype
        and "gbps" in r
    ]
    passes = [
        p
        for p in ("fwd", "bwd", "fwd+bwd")
        if any(r["pass"] == p and r["contender"] not in COPIES for r in sweep)
    ]
    if not passes or len({r["row_length"] for r in sweep}) < 2:
        return False
    copies: dict[int, float] = {}  # the faster copy of each shape, as "% of copy" uses
    for r in sweep:
        if r["contender"] in COPIES:
            copies[r["row_length"]] = max(copies.get(r["row_length"], 0.0), r["gbps"])
    copy = list(copies.values())
    copy_median = float(np.median(copy)) if copy else None
    figure, axes = plt.subplots(
        1, len(passes), figsize=(5.2 * len(passes), 4.2), squeeze=False, sharey=True
    )
    for axis, pass_ in zip(axes[0], passes, strict=True):
        for name in CONTENDERS:
            points = sorted(
                (r["row_length"], r) for r in sweep if r["pass"] == pass_ and r["contender"] == name
            )
            if points:
                lengths, gbps = [n for n, _ in points], np.array([r["gbps"] for _, r in points])
                low = gbps - np.array([r["model_bytes"] / r["p80_s"] / 1e9 for _, r in points])
                high = np.array([r["model_bytes"] / r["p20_s"] / 1e9 for _, r in points]) - gbps
                axis.errorbar(
                    lengths,
                    gbps,
                    yerr=[low, high],
                    label=name,
                    color=COLOURS[name],
                    marker="o",
                    markersize=3.5,
                    linewidth=2 if name == "jsoftmax" else 1.1,
                    capsize=2,
                )
        if copy_median:
            axis.axhline(
                copy_median,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"copy, median of the run ({copy_median:.1f} GB/s)",
            )
        axis.set(xscale="log", title=pass_, xlabel="row length N")
        axis.set_xscale("log", base=2)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("effective GB/s (model bytes / median time)")
    handles = {
        label: handle
        for axis in axes[0]
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True)
    }
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=min(len(handles), 4),
        fontsize=8,
        bbox_to_anchor=(0.5, -0.02),
    )
    shapes = sorted(
        {"x".join(map(str, r["shape"])) for r in sweep}, key=lambda s: int(s.split("x")[-1])
    )
    figure.suptitle(
        f"softmax {SHORT[dtype]}, shapes {shapes[0]} .. {shapes[-1]}: effective bandwidth\n"
        "(fwd moves 2x the input's bytes, bwd 3x, both 5x); bars: p20-p80",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    _save(figure, path)
    return True


def accuracy(rows: list[dict[str, Any]], path: Path) -> bool:
    """Max (bars) and median (dots) relative error per contender and dtype; floor as a line."""
    rows = [r for r in rows if r["section"] == "accuracy" and "max_rel_error" in r]
    if not rows:
        return False
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    names = [n for n in CONTENDERS if any(r["contender"] == n for r in rows)]
    width = 0.8 / len(names)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4), squeeze=False)
    for axis, op in zip(axes[0], ("softmax", "log_softmax"), strict=True):
        lookup = {(r["dtype"], r["contender"]): r for r in rows if r["op"] == op}
        for position, dtype in enumerate(dtypes):
            floor = lookup[(dtype, "floor")]["max_rel_error"]
            axis.hlines(
                floor,
                position - 0.45,
                position + 0.45,
                colors="black",
                linestyles="--",
                label="floor (max)" if position == 0 else None,
                zorder=3,
            )
            for index, name in enumerate(names):
                if (dtype, name) in lookup:
                    x, row = position - 0.4 + width * (index + 0.5), lookup[(dtype, name)]
                    axis.bar(
                        x,
                        row["max_rel_error"],
                        width=width * 0.9,
                        color=COLOURS[name],
                        label=name if position == 0 else None,
                    )
                    axis.plot(x, row["median_rel_error"], "k.", markersize=4)
        axis.set(yscale="log", title=f"{op}: max relative error (bars), median (dots)")
        axis.set_xticks(range(len(dtypes)), [SHORT[d] for d in dtypes])
        axis.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error against float64")
    axes[0][1].legend(fontsize=8, loc="upper left")
    figure.suptitle(
        f"accuracy on a {'x'.join(map(str, rows[0]['shape']))} input; dashed: the rounding floor"
    )
    figure.tight_layout()
    _save(figure, path)
    return True


def conversion(rows: list[dict[str, Any]], path: Path) -> bool:
    """Conversion time against tensor size (log-log): zero-copy stays flat."""
    rows = [r for r in rows if r["section"] == "conversion" and "median_s" in r]
    if not rows:
        return False
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["contender"] for r in rows):
        points = sorted((r["bytes"], r["median_s"] * 1e6) for r in rows if r["contender"] == name)
        axis.plot(
            *zip(*points, strict=True),
            marker="o",
            linestyle="--" if "copy" in name else "-",
            label=name,
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="tensor size (bytes, float32)",
        ylabel="time per call (us, median)",
        title="jsoftmax.interop conversions",
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    return True


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Every plot the rows have data for; returns the file names."""
    plots: list[tuple[str, Callable[[Path], bool]]] = [
        (f"bandwidth_{d}.png", partial(bandwidth, rows, d))
        for d in dict.fromkeys(r["dtype"] for r in rows if r["section"] == "timing")
    ]
    plots += [
        ("accuracy.png", partial(accuracy, rows)),
        ("interop.png", partial(conversion, rows)),
    ]
    return [name for name, plot in plots if plot(out / name)]
