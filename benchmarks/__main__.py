"""``python -m benchmarks``: the benchmark report. See ``--help`` and benchmarks/NOTES.md."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _report
from ._config import (
    CONTENDERS,
    DTYPE_ALIASES,
    OPS,
    PASSES,
    SECTIONS,
    RunConfig,
    parse_shapes,
    plan_cases,
)
from ._contenders import DeviceUnavailable
from ._environment import MALLOC_DEFAULT, describe, format_environment, keep_freed_memory
from ._run import run

SUITES = ("headline", "triton", "lm", "attention", "classification", "non-last-axis")


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _choices(parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]):
    items = _split(text)
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        parser.error(f"{option} expected a comma list of {', '.join(allowed)}, got {text!r}")
    return tuple(items)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Times and checks jsoftmax against jax.nn, a naive jnp formula, torch and "
        "torch.compile; writes report.md, results.json, timings.csv, accuracy.csv and PNG plots.",
    )
    parser.add_argument("--quick", action="store_true", help="the ~3 minute subset")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--dtype", help="comma list of f32, bf16, f16 (default: cpu f32,bf16)")
    parser.add_argument("--out", default="bench-results", help="output folder")
    parser.add_argument(
        "--only",
        help="comma list of ops (softmax, log_softmax) and sections "
        f"({', '.join(SECTIONS)}); an op alone times that op and nothing else",
    )
    parser.add_argument("--passes", help="comma list of fwd, bwd, fwd+bwd")
    parser.add_argument(
        "--shapes", help="e.g. 4096x4096,1024x4096: these shapes instead of the suites"
    )
    parser.add_argument("--axis", type=int, default=-1, help="axis for --shapes (default -1)")
    parser.add_argument("--suites", help=f"comma list of {', '.join(SUITES)}")
    parser.add_argument("--contenders", help=f"comma list of {', '.join(CONTENDERS)}")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="only the five headline shapes, float32, fwd and fwd+bwd: the A/B set",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--budget", type=float, help="seconds of samples per case")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--samples", action="store_true", help="keep raw samples in the JSON")
    parser.add_argument(
        "--malloc-reuse",
        action="store_true",
        help="let glibc reuse freed memory for large blocks instead of fresh pages (changes "
        "torch's CPU allocations, not JAX's; recorded in the report)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge into the results already in --out (same case and contender: the new row "
        "wins): split a long run into parts, e.g. by --suites",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the planned cases and exit")
    parser.add_argument(
        "--render-results",
        action="store_true",
        help="write benchmarks/RESULTS.md from the runs under benchmarks/results/ and exit",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and 3 rounds everywhere: checks that the harness runs (CI); its "
        "figures mean nothing",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[RunConfig, str | None]:
    """The run's settings from the command line, and the action instead of a run, if any."""
    parser = build_parser()
    args = parser.parse_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    config = RunConfig(
        device=args.device,
        quick=args.quick or args.smoke,
        seed=args.seed,
        smoke=args.smoke,
        command=" ".join(["python -m benchmarks", *(shlex.quote(word) for word in words)]),
    )
    config.out = Path(args.out)
    if args.dtype:
        names = _choices(parser, "--dtype", args.dtype, tuple(DTYPE_ALIASES))
        config.dtypes = tuple(dict.fromkeys(DTYPE_ALIASES[name] for name in names))
    if args.smoke and not args.dtype:
        config.dtypes = ("float32",)
    if args.headline:
        config.suites = ("headline",)
        config.passes = ("fwd", "fwd+bwd")
        config.dtypes = config.dtypes or ("float32",)
        config.sections = ("timing",)
    if args.only:
        tokens = _choices(parser, "--only", args.only, OPS + SECTIONS)
        ops = tuple(token for token in tokens if token in OPS)
        sections = [token for token in tokens if token in SECTIONS]
        if ops:
            config.ops = ops
            sections.append("timing")
        config.sections = tuple(dict.fromkeys(sections))
    if args.passes:
        config.passes = _choices(parser, "--passes", args.passes, PASSES)
    if args.shapes:
        try:
            config.shapes = parse_shapes(args.shapes)
        except ValueError as err:
            parser.error(str(err))
        for shape in config.shapes:
            if not -len(shape) <= args.axis < len(shape):
                parser.error(f"--axis expected a valid axis of every shape, got {args.axis}")
        config.axis = args.axis
    if args.suites:
        config.suites = _choices(parser, "--suites", args.suites, SUITES)
    if args.contenders:
        config.contenders = _choices(parser, "--contenders", args.contenders, CONTENDERS)
    if args.no_compile:
        config.torch_compile = False
    if args.budget is not None:
        if args.budget <= 0:
            parser.error(f"--budget expected a positive number of seconds, got {args.budget}")
        config.budget_s = args.budget
    config.plots = not args.no_plots
    config.keep_samples = args.samples
    config.merge = args.merge
    config.malloc_reuse = args.malloc_reuse
    action = "list" if args.list else "render" if args.render_results else None
    return config, action


BENCHMARKS_DIR = Path(__file__).resolve().parent


def render_results(benchmarks_dir: Path = BENCHMARKS_DIR) -> Path:
    """Writes ``RESULTS.md`` from the runs under ``results/``; returns its path."""
    path = benchmarks_dir / "RESULTS.md"
    path.write_text(_report.render_results_md(benchmarks_dir / "results", benchmarks_dir))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    config, action = config_from_args(argv)
    if action == "render":
        print(f"Wrote {render_results()}")
        return 0
    cases = plan_cases(config) if "timing" in config.sections else []
    if action == "list":
        for case in cases:
            print(case.label(), f"[{'+'.join(case.suites)}]")
        print(f"{len(cases)} cases; contenders: {', '.join(config.resolved_contenders())}")
        return 0
    import torch

    from ._environment import usable_cores

    torch.set_num_threads(usable_cores())
    print("# jsoftmax benchmarks\n")
    malloc = keep_freed_memory() if config.malloc_reuse else MALLOC_DEFAULT
    print(format_environment(describe(config.device, torch.get_num_threads(), malloc)))
    print(
        f"\n{'quick' if config.quick else 'full'} run: {len(cases)} timed cases, contenders "
        f"{', '.join(config.resolved_contenders())}; sections {', '.join(config.sections)}; "
        f"progress on stderr\n",
        flush=True,
    )
    merge = config.merge
    try:
        report = run(config)
    except DeviceUnavailable as err:  # say so without a traceback
        print(str(err), file=sys.stderr)
        return 2
    report = _report.rounded(report)  # what is printed is what is stored
    paths = {}
    previous = None if config.out is None else config.out / "results.json"
    if merge and previous is not None and previous.exists():
        report = _report.merge_reports(_report.load_report(previous), report)
    if config.out is not None:
        paths = _report.write_outputs(
            report, config.out, plots=config.plots, keep_samples=config.keep_samples
        )
    plot_names = [name for name in paths if name.endswith(".png")]
    print(_report.format_report(report, plot_names))
    print(_report.format_headline(report.get("headline")))
    print()
    print(f"Took {report['elapsed_s']:.0f} s.", end=" ")
    if paths:
        print(f"Wrote {', '.join(sorted(paths))} to {config.out}/")
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
