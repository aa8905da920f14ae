"""``python -m benchmarks``: see ``--help`` and benchmarks/NOTES.md.

JAX and torch are imported only after the arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import _report
from ._plan import (
    CONTENDERS,
    DTYPES,
    HEADLINE_PASSES,
    OPS,
    PASSES,
    SECTIONS,
    SUITES,
    RunConfig,
    parse_shapes,
    plan_cases,
)

BENCHMARKS = Path(__file__).resolve().parent


class _Help(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help states it (flags: off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.const:
            return text
        return text + " (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        formatter_class=_Help,
        description="Times and checks jsoftmax against jax.nn (jitted), the naive jnp formula, "
        "torch eager and torch.compile in one process; writes report.md, results.json, a CSV per "
        "section and PNG plots to --out. --quick takes about 3 minutes on 2 CPU cores.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="the ~3 minute subset (no plain/steps sections)")
    add("--device", default="cpu", choices=("cpu", "gpu"), help="where JAX and torch run")
    add("--out", default="bench-results", help="output folder")
    add("--dtype", help="comma list of f32, bf16, f16 (default: f32,bf16; full GPU runs add f16)")
    add(
        "--only",
        help=f"comma list of ops ({', '.join(OPS)}) and sections ({', '.join(SECTIONS)}); "
        "an op alone times that op and runs no other section (default: every section)",
    )
    add("--passes", default=",".join(PASSES), help="comma list of fwd, bwd, fwd+bwd")
    add(
        "--shapes",
        help="e.g. 4096x4096,1024x4096: these shapes instead of the suites (default: the suites)",
    )
    add("--axis", type=int, default=-1, help="the axis normalised by --shapes")
    add("--suites", default=",".join(SUITES), help="shape suites of the timing section")
    add("--contenders", default=",".join(CONTENDERS), help="xla-fused runs on GPU only")
    add(
        "--headline",
        action="store_true",
        help="the five headline shapes, f32, fwd and fwd+bwd, timing only: the A/B set",
    )
    add("--no-compile", action="store_true", help="leave torch.compile out")
    add("--budget", type=float, help="seconds of samples per case (default: 0.25 quick, 1 full)")
    add(
        "--settle",
        type=float,
        help="seconds of idling before each sample (default: 0.01 on CPU, 0 on GPU; 0: none)",
    )
    add(
        "--time-limit",
        type=float,
        help="seconds after which no new case or section starts (default: none)",
    )
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add("--samples", action="store_true", help="keep the raw samples in results.json")
    add(
        "--malloc-reuse",
        action="store_true",
        help="let glibc reuse freed memory for large blocks (torch's CPU allocations)",
    )
    add(
        "--merge",
        action="store_true",
        help="merge into the results in --out (same case and contender: the new row wins)",
    )
    add("--seed", type=int, default=0, help="seed of every input")
    add("--list", action="store_true", help="print the planned timing cases and exit")
    add(
        "--render-results",
        action="store_true",
        help="write benchmarks/RESULTS.md from benchmarks/results/*/ and exit",
    )
    add(
        "--smoke",
        action="store_true",
        help="tiny sizes, 3 rounds: checks that the harness runs; its figures mean nothing",
    )
    return parser


def _items(
    parser: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]
) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items or any(item not in allowed for item in items):
        parser.error(f"{flag} expected a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def config_from_args(argv: Sequence[str]) -> tuple[RunConfig, argparse.Namespace]:
    parser = _parser()
    args = parser.parse_args(argv)
    config = RunConfig(
        device=args.device,
        quick=args.quick or args.smoke,
        smoke=args.smoke,
        out=Path(args.out),
        passes=_items(parser, "--passes", args.passes, PASSES),
        suites=_items(parser, "--suites", args.suites, SUITES),
        contenders=_items(parser, "--contenders", args.contenders, CONTENDERS),
        torch_compile=not args.no_compile,
        plots=not args.no_plots,
        keep_samples=args.samples,
        malloc_reuse=args.malloc_reuse,
        merge=args.merge,
        seed=args.seed,
        time_limit_s=args.time_limit,
        command=" ".join(["python -m benchmarks", *map(shlex.quote, argv)]),
    )
    if args.dtype:
        config.dtypes = tuple(
            dict.fromkeys(DTYPES[d] for d in _items(parser, "--dtype", args.dtype, tuple(DTYPES)))
        )
    if args.headline:
        config.suites, config.passes, config.sections = ("headline",), HEADLINE_PASSES, ("timing",)
        config.dtypes = config.dtypes or ("float32",)
    if args.only:
        tokens = _items(parser, "--only", args.only, OPS + SECTIONS)
        config.ops = tuple(t for t in tokens if t in OPS) or OPS
        timed = ["timing"] * any(t in OPS for t in tokens)  # an op alone: that op's timings
        config.sections = tuple(dict.fromkeys([t for t in tokens if t in SECTIONS] + timed))
    if args.shapes:
        try:
            config.shapes = parse_shapes(args.shapes)
        except ValueError as err:
            parser.error(str(err))
        if any(not -len(s) <= args.axis < len(s) for s in config.shapes):
            parser.error(f"--axis expected a valid axis of every shape, got {args.axis}")
        config.axis = args.axis
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget expected a positive number of seconds, got {args.budget}")
    config.budget_s = args.budget
    if args.settle is not None and not 0 <= args.settle <= 1:
        parser.error(f"--settle expected seconds from 0 to 1, got {args.settle}")
    config.settle_s = args.settle
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    begin = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = config_from_args(argv)
    if args.render_results:
        (BENCHMARKS / "RESULTS.md").write_text(_report.render_results(BENCHMARKS))
        print(f"Wrote {BENCHMARKS / 'RESULTS.md'}")
        return 0
    if args.list:
        cases = plan_cases(config)
        print("\n".join(f"{case.label()} [{'+'.join(case.suites)}]" for case in cases))
        print(f"{len(cases)} cases")
        return 0
    missing = {
        name: why
        for name, why in (
            ("torch", "no torch contenders, no interop section"),
            ("matplotlib", "no plots"),
            ("optax", "no optax column in cross-entropy"),
        )
        if importlib.util.find_spec(name) is None
    }
    for name, why in missing.items():
        print(
            f'Optional package {name} is not installed: {why} (pip install -e ".[bench]" adds it).'
        )
    if "matplotlib" in missing:
        config.plots = False
    out = config.out or Path("bench-results")
    previous = (
        _report.load_report(out / "results.json")
        if config.merge and (out / "results.json").exists()
        else None
    )
    mode = "quick" if config.quick else "full"
    print(f"# jsoftmax benchmarks: {mode} run on {config.device}, into {out}/; progress on stderr")

    def save(report: dict) -> None:
        _report.write_outputs(_report.merge(previous, report) if previous else report, out)

    from ._sections import run

    try:
        report = run(config, save=save)
    except RuntimeError as err:  # --device gpu without a GPU: say so without a traceback
        print(f"benchmarks: {err}", file=sys.stderr)
        return 2
    report = _report.merge(previous, report) if previous else report
    report["elapsed_s"] = time.perf_counter() - begin  # imports included
    written = _report.write_outputs(report, out)
    plots: list[str] = []
    if config.plots:
        try:
            from ._plots import write_plots

            plots = write_plots(report["rows"], out)
        except Exception as err:  # the figures are written already: a plot must not lose them
            print(f"Plots failed ({type(err).__name__}: {err}); the other files are complete.")
        report["elapsed_s"] = time.perf_counter() - begin
        report["peak_rss_bytes"] = _report.peak_rss_bytes()
        _report.write_outputs(report, out, plots)
    print(_report.format_report(report, plots))
    print(
        f"Took {report['elapsed_s']:.0f} s, peak memory {report['peak_rss_bytes'] / 2**30:.2f} GiB."
    )
    print(f"Wrote {', '.join(written + plots)} to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
