"""The sections of a run, and :func:`run`, which runs them and saves after every measurement.

A row names its ``section``, its ``case`` (the table row it lands in) and its ``contender``;
timed rows carry ``median_s`` with its spread, failed ones ``error``. Runners are prepared inside
a try (:func:`prepare`), so a contender that fails at setup or while running becomes a row with
an error and every other figure stands.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jsoftmax

from . import _report
from ._contenders import (
    Inputs,
    Target,
    jax_function,
    make_runner,
    make_target,
    torch_function,
    torch_sync,
)
from ._measure import Runner, measure
from ._plan import (
    BYTES_FACTOR,
    CONTENDERS,
    COPIES,
    HEADLINE_PASSES,
    HEADLINE_SHAPES,
    OPS,
    SHORT,
    RunConfig,
    plan_cases,
)
from ._plan import shape_label as label

Rows = list[dict[str, Any]]


class Context:
    """What every section needs, and the report it adds its rows to."""

    def __init__(self, config: RunConfig, target: Target, progress: Callable[[str], None]):
        self.config, self.target, self.progress = config, target, progress
        self.has_torch = target.torch_device is not None
        self.optax = _optional("optax")
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"notes": [], "rows": []}
        self.save: Callable[[dict[str, Any]], None] | None = None

    def add(self, rows: Rows) -> Rows:
        """Adds rows, derives the ratios and saves: nothing measured is lost to a later failure."""
        self.report["rows"] += rows
        _report.annotate(self.report["rows"])
        self.report["headline"] = _report.summary(self.report["rows"], headline_only=True)
        self.report["summary"] = _report.summary(self.report["rows"], headline_only=False)
        if self.save is not None:
            self.save(self.report)
        return rows

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The size of something for this run: tiny (smoke), quick or full."""
        return smoke if self.config.smoke else quick if self.config.quick else full

    def over_time(self) -> bool:
        limit = self.config.time_limit_s
        return limit is not None and time.perf_counter() - self.start > limit

    def note(self, text: str) -> None:
        self.report["notes"].append(text)
        self.progress(f"  {text}")

    def time(
        self, runners: Iterable[Any], fields: dict[str, Any], at: str = "  ", **options: Any
    ) -> Rows:
        """Times runners (or ``(name, error)`` pairs) interleaved; rows carry ``fields``."""
        options = {
            "budget_s": self.config.budget(),
            "rounds": self.config.rounds(),
            "settle_s": self.config.settle(),
            **options,
        }
        rows = measure(
            list(runners),
            sync_each=not self.target.gpu,
            keep_samples=self.config.keep_samples,
            **options,
        )
        times = (
            f"{r['contender']} "
            + (f"{r['median_s'] * 1e3:.3g} ms" if "median_s" in r else "failed")
            for r in rows
        )
        self.progress(f"{at}{fields['section']} {fields['case']}: {', '.join(times)}")
        return self.add([{**fields, **row} for row in rows])


def _optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def prepare(name: str, build: Callable[[], Any], sync: Any = jax.block_until_ready) -> Any:
    """``build()`` as a runner (a bare callable becomes one), or ``(name, error)`` if it raised."""
    try:
        built = build()
    except Exception as err:
        return (name, err)
    return built if isinstance(built, Runner) else Runner(name, built, sync)


def _jitted(f: Callable[..., Any], pass_: str, x: Any, g: Any) -> Callable[[], Any]:
    """``jax.jit(f)(x)``, or the gradient ``jax.jit(lambda x, g: jax.vjp(f, x)[1](g))(x, g)``."""
    if pass_ == "fwd":
        forward = jax.jit(f)
        return lambda: forward(x)
    gradient = jax.jit(lambda x, g: jax.vjp(f, x)[1](g))
    return lambda: gradient(x, g)


def timing(ctx: Context) -> None:
    """Every planned softmax case; the copy reference rides with a shape's first case."""
    config, copied = ctx.config, set()
    cases = plan_cases(config)
    for index, case in enumerate(cases, 1):
        if ctx.over_time():
            ctx.note(
                f"--time-limit reached: the last {len(cases) - index + 1} timed cases were skipped"
            )
            return
        names = list(config.case_contenders(case))
        if (case.shape, case.dtype) not in copied:
            copied.add((case.shape, case.dtype))
            names += [name for name in COPIES if ctx.has_torch or name == "copy:jax"]
        inputs = Inputs(case, ctx.target, config.seed)
        runners = [prepare(name, partial(make_runner, name, case, inputs)) for name in names]
        for runner in runners:
            if isinstance(runner, Runner):
                factor = BYTES_FACTOR["copy" if runner.name in COPIES else case.pass_]
                runner.extra["model_bytes"] = factor * case.size * jnp.dtype(case.dtype).itemsize
        fields: dict[str, Any] = {
            "section": "timing",
            "case": case.label(),
            "op": case.op,
            "shape": list(case.shape),
            "axis": case.axis,
        }
        fields |= {
            "row_length": case.shape[case.axis],
            "dtype": case.dtype,
            "pass": case.pass_,
            "suites": "+".join(case.suites),
        }
        ctx.time(
            runners,
            fields,
            at=f"[{index}/{len(cases)} {time.perf_counter() - ctx.start:.0f}s "
            f"{_report.peak_rss_bytes() / 2**30:.1f} GiB] ",
        )
        del runners, inputs
        release_memory()


def host_dtype(name: str) -> Any:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def reference(op: str, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(output, input gradient)`` over the last axis.

    >>> out, grad = reference("softmax", np.array([0.0, np.log(3.0)]), np.array([1.0, 0.0]))
    >>> print(out.round(4), grad.round(4))
    [0.25 0.75] [ 0.1875 -0.1875]
    """
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    shifted = x64 - x64.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    probs = np.exp(log_probs)
    if op == "softmax":
        return probs, probs * (g64 - (g64 * probs).sum(axis=-1, keepdims=True))
    return log_probs, g64 - probs * g64.sum(axis=-1, keepdims=True)


def relative_errors(approx: Any, exact: np.ndarray, dtype: str) -> tuple[float, float]:
    """Max and median of ``|approx - exact| / |exact|`` over the entries whose exact value is a
    normal number of the dtype; a non-finite error counts as infinite.

    >>> relative_errors(np.array([1.0, 2.2, 0.0]), np.array([1.0, 2.0, 1e-45]), "float32")
    (0.10000000000000009, 0.050000000000000044)
    """
    scored = np.abs(exact) >= float(ml_dtypes.finfo(host_dtype(dtype)).tiny)
    approx = np.asarray(approx, np.float64)[scored]
    with np.errstate(invalid="ignore"):
        error = np.abs(approx - exact[scored]) / np.abs(exact[scored])
    error = np.where(np.isfinite(error), error, np.inf)
    return float(error.max()), float(np.median(error))


def normwise_error(approx: Any, exact: np.ndarray) -> float:
    """``max |approx - exact| / max |exact|``: a gradient's entries cancel, so not elementwise."""
    approx = np.asarray(approx, np.float64)
    if not np.all(np.isfinite(approx)):
        return float("inf")
    return float(np.abs(approx - exact).max() / max(float(np.abs(exact).max()), 1e-300))


def accuracy(ctx: Context) -> None:
    """Each contender's error against float64 per dtype and op, computed from the dtype-rounded
    input, with the floor: the float64 result rounded once to the dtype, the best possible."""
    config = ctx.config
    shape = ctx.pick((8, 256), (64, 4096), (256, 4096))
    rng = np.random.default_rng(config.seed + 1)
    x32 = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
    g32 = rng.standard_normal(shape, dtype=np.float32)
    names = [
        n for n in CONTENDERS if n in config.contenders and n not in ("xla-fused", "torch.compile")
    ]
    rows = []
    for dtype in config.dtypes or ("float32", "bfloat16", "float16"):
        x, g = x32.astype(host_dtype(dtype)), g32.astype(host_dtype(dtype))
        for op in OPS:
            fields: dict[str, Any] = {
                "section": "accuracy",
                "case": f"{op} {SHORT[dtype]}",
                "op": op,
                "dtype": dtype,
                "shape": list(shape),
            }
            exact, exact_grad = reference(op, x, g)
            results: dict[str, tuple[Any, Any]] = {
                "floor": (exact.astype(x.dtype), exact_grad.astype(x.dtype))
            }
            for name in names:
                try:
                    results[name] = _output_and_grad(ctx, name, op, x, g)
                except Exception as err:
                    rows.append(
                        {**fields, "contender": name, "error": f"{type(err).__name__}: {err}"[:200]}
                    )
            for name, (out, grad) in results.items():
                worst, median = relative_errors(out, exact, dtype)
                errors = {
                    "max_rel_error": worst,
                    "median_rel_error": median,
                    "grad_error": normwise_error(grad, exact_grad),
                }
                rows.append({**fields, "contender": name, **errors})
    ctx.add(rows)


def _output_and_grad(
    ctx: Context, name: str, op: str, x: np.ndarray, g: np.ndarray
) -> tuple[Any, Any]:
    if name != "torch":
        put = partial(jax.device_put, device=ctx.target.jax_device)
        out, pullback = jax.vjp(jax_function(name, op, -1), put(x))
        return np.asarray(out), np.asarray(pullback(put(g))[0])
    import torch

    dtype = getattr(torch, x.dtype.name)
    x_t, g_t = (
        torch.from_numpy(a.astype(np.float32)).to(ctx.target.torch_device, dtype) for a in (x, g)
    )
    x_t.requires_grad_(True)
    out = torch_function(name, op, -1)(x_t)
    grad = torch.autograd.grad(out, x_t, g_t)[0]
    return out.detach().float().cpu().numpy(), grad.float().cpu().numpy()


def interop(ctx: Context) -> None:
    """``from_torch`` / ``to_torch`` time against size (zero-copy: flat), with ``copy=True``
    beside them; then ``jsoftmax.interop`` softmax against torch on the same tensors."""
    if not ctx.has_torch:
        return ctx.note("interop section skipped: torch is not installed")
    import torch

    from jsoftmax import interop as bridge

    config, device, sync = ctx.config, ctx.target.torch_device, torch_sync(ctx.target)
    budget = min(config.budget(), 0.5)
    for exponent in ctx.pick((8, 12), (10, 16, 22), (10, 14, 18, 22, 26)):
        tensor = torch.randn(2**exponent, device=device)
        array = bridge.from_torch(tensor.clone(), copy=True)
        sources: list[tuple[str, Any, Any, Any]] = [
            ("from_torch", bridge.from_torch, tensor, jax.block_until_ready),
            ("to_torch", bridge.to_torch, array, sync),
        ]
        runners = [
            Runner(
                f"{name}{'(copy=True)' if copy else ''}",
                partial(function, source, copy=copy or None),
                synced,
            )
            for name, function, source, synced in sources
            for copy in (False, True)
        ]
        ctx.time(
            runners,
            {"section": "conversion", "case": f"2^{exponent} f32", "bytes": 4 * 2**exponent},
            budget_s=budget,
        )
    for op in OPS:
        for shape in ctx.pick([(8, 256)], [(64, 4096), (1024, 4096)], INTEROP_SHAPES):
            for pass_ in HEADLINE_PASSES:
                x, g = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
                functions = {"jsoftmax.interop": getattr(bridge, op), "torch": getattr(torch, op)}
                runners = [
                    prepare(n, partial(_bridged, f, pass_, x.clone(), g), sync)
                    for n, f in functions.items()
                ]
                ctx.time(
                    runners,
                    {"section": "interop", "case": f"{op} {pass_} {label(shape)}"},
                    budget_s=budget,
                )


INTEROP_SHAPES = [(64, 4096), (1024, 4096), (4096, 4096)]


def _bridged(function: Callable[..., Any], pass_: str, x: Any, g: Any) -> Callable[[], Any]:
    import torch

    if pass_ == "fwd":
        return lambda: function(x, -1)
    x.requires_grad_(True)
    return lambda: (lambda out: (out, torch.autograd.grad(out, x, g)[0]))(function(x, -1))


def overhead(ctx: Context) -> None:
    """Per-call cost on an 8x128 float32 input, where the arithmetic is negligible."""
    host = np.random.default_rng(0).standard_normal((8, 128), dtype=np.float32)
    array = jax.device_put(host, ctx.target.jax_device)
    jitted = jax.jit(partial(jsoftmax.softmax, axis=-1))
    runners = [
        Runner("jsoftmax.softmax(x)", lambda: jsoftmax.softmax(array), jax.block_until_ready),
        Runner("jax.jit(jsoftmax.softmax)(x)", lambda: jitted(array), jax.block_until_ready),
        Runner("jax.nn.softmax(x)", lambda: jax.nn.softmax(array), jax.block_until_ready),
    ]
    if ctx.has_torch:
        tensor = __import__("torch").from_numpy(host).to(ctx.target.torch_device)
        runners.append(
            Runner("torch.softmax(x, -1)", lambda: tensor.softmax(-1), torch_sync(ctx.target))
        )
    ctx.time(
        runners,
        {"section": "overhead", "case": "8x128 f32"},
        budget_s=min(ctx.config.budget(), 0.5),
    )


def _jax_nn_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)
    return -jnp.mean(picked.astype(jnp.float32)).astype(logits.dtype)


def losses(ctx: Context) -> dict[str, Callable[..., Any]]:
    """The mean integer-label cross-entropy of each JAX contender (optax when installed)."""
    found: dict[str, Callable[..., Any]] = {
        "jsoftmax": jsoftmax.cross_entropy,
        "jax.nn": _jax_nn_cross_entropy,
    }
    if ctx.optax is not None:
        per_row = ctx.optax.softmax_cross_entropy_with_integer_labels
        found["optax"] = lambda logits, labels: jnp.mean(per_row(logits, labels))
    return found


def cross_entropy(ctx: Context) -> None:
    """The mean loss from logits and integer labels (fwd), and its value and gradient (fwd+bwd),
    against the jax.nn formula, optax and torch; then the loss's error against float64."""
    config = ctx.config
    if ctx.optax is None:
        ctx.note("cross-entropy: optax is not installed, its column is left out")
    rng = np.random.default_rng(config.seed + 2)
    for shape in ctx.pick(
        [(16, 1000)], [(256, 32000)], [(512, 32000), (128, 128256), (4096, 1000)]
    ):
        host = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
        labels = rng.integers(0, shape[1], size=shape[0])
        for dtype in ("float32",) if config.quick else config.resolved_dtypes():
            for pass_ in HEADLINE_PASSES:
                logits = jax.device_put(host, ctx.target.jax_device).astype(dtype)
                targets = jax.device_put(labels.astype(np.int32), ctx.target.jax_device)
                grad = jax.value_and_grad
                jitted = {
                    n: jax.jit(f if pass_ == "fwd" else grad(f)) for n, f in losses(ctx).items()
                }
                runners = [
                    Runner(n, partial(f, logits, targets), jax.block_until_ready)
                    for n, f in jitted.items()
                ]
                compiled = "torch.compile" in config.contenders and not config.quick
                for name in (["torch"] + ["torch.compile"] * compiled) if ctx.has_torch else []:
                    build = partial(_torch_loss, ctx, name, pass_, host, labels, dtype)
                    runners.append(prepare(name, build, torch_sync(ctx.target)))
                ctx.time(
                    runners,
                    {"section": "cross_entropy", "case": f"{SHORT[dtype]} {pass_} {label(shape)}"},
                )
    _loss_accuracy(ctx)


def _torch_loss(
    ctx: Context, name: str, pass_: str, host: Any, labels: Any, dtype: str
) -> Callable[[], Any]:
    import torch

    loss = torch.nn.functional.cross_entropy
    if name == "torch.compile":
        torch._dynamo.reset()
        loss = torch.compile(loss, dynamic=False)
    logits = torch.from_numpy(host).to(ctx.target.torch_device, getattr(torch, dtype))
    logits.requires_grad_(pass_ != "fwd")
    target = torch.from_numpy(labels).to(logits.device)
    if pass_ == "fwd":
        return lambda: loss(logits, target)
    return lambda: (lambda value: (value, torch.autograd.grad(value, logits)[0]))(
        loss(logits, target)
    )


def _loss_accuracy(ctx: Context) -> None:
    """Relative error of each mean loss against float64, per dtype."""
    count, classes = ctx.pick((16, 256), (256, 4096), (256, 4096))
    rng = np.random.default_rng(ctx.config.seed + 3)
    host = rng.standard_normal((count, classes), dtype=np.float32) * np.float32(3.0)
    labels = rng.integers(0, classes, size=count)
    rows = []
    for dtype in ctx.config.resolved_dtypes():
        logits = jax.device_put(host, ctx.target.jax_device).astype(dtype)
        log_probs, _ = reference("log_softmax", np.asarray(logits.astype(jnp.float32)), host)
        exact = -log_probs[np.arange(count), labels].mean()
        values = {
            name: float(jax.jit(f)(logits, labels.astype(np.int32)))
            for name, f in losses(ctx).items()
        }
        if ctx.has_torch:
            import torch

            tensor = torch.from_numpy(host).to(ctx.target.torch_device, getattr(torch, dtype))
            values["torch"] = float(
                torch.nn.functional.cross_entropy(
                    tensor, torch.from_numpy(labels).to(tensor.device)
                )
            )
        fields = {"section": "loss_accuracy", "case": SHORT[dtype], "dtype": dtype}
        rows += [
            {**fields, "contender": name, "rel_error": abs(value - exact) / exact}
            for name, value in values.items()
        ]
    ctx.add(rows)


def plain(ctx: Context) -> None:
    """The plain harness: ``jax.jit(f)(x)`` on one fixed ``x`` (no rotation), and the gradient
    ``jax.jit(lambda x, g: jax.vjp(f, x)[1](g))``, against jax.nn jitted alike and torch eager;
    medians of 7 interleaved rounds with no idling between samples (as a harness written apart
    from the project would run them), float32, the headline shapes."""
    rng = np.random.default_rng(ctx.config.seed + 4)
    for shape in ctx.pick([(64, 4096)], HEADLINE_SHAPES, HEADLINE_SHAPES):
        host = rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)
        x = jax.device_put(host, ctx.target.jax_device)
        g = jax.device_put(rng.standard_normal(shape, dtype=np.float32), ctx.target.jax_device)
        for op in ctx.pick(OPS[:1], OPS, OPS):
            for pass_ in ("fwd", "grad"):
                names = ("jsoftmax", "jax.nn")
                runners = [
                    prepare(n, partial(_jitted, jax_function(n, op, -1), pass_, x, g))
                    for n in names
                ]
                if ctx.has_torch:
                    runners.append(
                        prepare(
                            "torch",
                            partial(_plain_torch, ctx, op, pass_, host),
                            torch_sync(ctx.target),
                        )
                    )
                fields: dict[str, Any] = {
                    "section": "plain",
                    "case": f"{op} {pass_} {label(shape)}",
                    "op": op,
                    "pass": pass_,
                }
                fields |= {"shape": list(shape), "axis": 1, "dtype": "float32"}
                ctx.time(runners, fields, budget_s=0.0, rounds=(7, 7), settle_s=0.0)


def _plain_torch(ctx: Context, op: str, pass_: str, host: np.ndarray) -> Callable[[], Any]:
    import torch

    x = torch.from_numpy(host).to(ctx.target.torch_device).requires_grad_(pass_ != "fwd")
    g, function = torch.ones_like(x), torch_function("torch", op, -1)
    return (
        (lambda: function(x))
        if pass_ == "fwd"
        else lambda: torch.autograd.grad(function(x), x, g)[0]
    )


def steps(ctx: Context) -> None:
    """Jitted steps of a model: causal attention-score softmax (forward, gradient), a classifier
    head's cross-entropy value and gradient, and a small MLP's training step with log_softmax."""
    smoke = ctx.config.smoke
    rng = np.random.default_rng(ctx.config.seed + 5)

    def put(shape: tuple[int, ...], scale: float = 1.0, dtype: str = "float32") -> jax.Array:
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return jax.device_put(values, ctx.target.jax_device).astype(dtype)

    scores_shape = (1, 2, 16, 16) if smoke else (4, 8, 512, 512)
    causal = np.tril(np.ones(scores_shape[-2:], bool))
    for dtype in ("float32",) if smoke else ("float32", "bfloat16"):
        scores, g = put(scores_shape, 3.0, dtype), put(scores_shape, 1.0, dtype)
        for pass_ in ("fwd", "grad"):
            functions = {
                n: partial(m.softmax, where=causal)
                for n, m in (("jsoftmax", jsoftmax), ("jax.nn", jax.nn))
            }
            runners = [
                prepare(n, partial(_jitted, f, pass_, scores, g)) for n, f in functions.items()
            ]
            case = f"causal attention softmax {SHORT[dtype]} {pass_} {label(scores_shape)}"
            ctx.time(runners, {"section": "steps", "case": case})
    batch, width, classes = (16, 8, 64) if smoke else (1024, 256, 32000)
    features, weights = put((batch, width)), put((width, classes), width**-0.5)
    labels = jnp.asarray(rng.integers(0, classes, size=batch), jnp.int32)

    def head(loss: Callable[..., Any], weights: jax.Array) -> Any:
        return loss(features @ weights, labels)

    heads = {n: jax.jit(jax.value_and_grad(partial(head, f))) for n, f in losses(ctx).items()}
    runners = [Runner(n, partial(f, weights), jax.block_until_ready) for n, f in heads.items()]
    case = f"classifier head value_and_grad [{batch}x{width}]@[{width}x{classes}]"
    ctx.time(runners, {"section": "steps", "case": case})
    sizes = (16, 32, 32, 10) if smoke else (512, 784, 1024, 1000)  # batch, input, hidden, classes
    params = [put(sizes[1:3], sizes[1] ** -0.5), put(sizes[2:4], sizes[2] ** -0.5)]
    x, y = put(sizes[:2]), jnp.asarray(rng.integers(0, sizes[3], size=sizes[0]), jnp.int32)
    log_softmaxes: dict[str, Callable[..., Any]] = {
        "jsoftmax": jsoftmax.log_softmax,
        "jax.nn": jax.nn.log_softmax,
    }
    runners = [prepare(n, partial(_mlp_step, f, params, x, y)) for n, f in log_softmaxes.items()]
    case = f"MLP training step {sizes[1]} -> {sizes[2]} -> {sizes[3]}, batch {sizes[0]}, SGD"
    ctx.time(runners, {"section": "steps", "case": case})


def _mlp_step(
    log_softmax: Callable[..., Any], params: list[Any], x: Any, y: Any
) -> Callable[[], Any]:
    def loss(params: list[Any]) -> Any:
        log_probs = log_softmax(jax.nn.relu(x @ params[0]) @ params[1])
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    @jax.jit
    def train(params: list[Any]) -> Any:
        value, grads = jax.value_and_grad(loss)(params)
        return value, [p - 0.01 * dp for p, dp in zip(params, grads, strict=True)]

    return partial(train, params)


SECTIONS = {
    "timing": timing,
    "accuracy": accuracy,
    "interop": interop,
    "overhead": overhead,
    "cross_entropy": cross_entropy,
    "plain": plain,
    "steps": steps,
}


def release_memory() -> None:
    """Collects garbage and hands glibc's free heap pages back, so that blocks freed by one
    case (below glibc's 32 MiB mmap threshold they come from the heap) do not add up in RSS."""
    gc.collect()
    try:
        __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> str:
    """Asks glibc to serve large blocks from memory it keeps instead of fresh pages, whose first
    touch costs page faults (torch's CPU allocations; JAX's buffers do not come from glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, 2**30) and libc.mallopt(-1, 2**31 - 1):  # M_MMAP_, M_TRIM_THRESHOLD
            return "glibc keeps freed memory (--malloc-reuse)"
    except (OSError, AttributeError):
        pass
    return "process default"


def run(
    config: RunConfig,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs the configured sections; returns every figure with the environment and settings.

    ``save`` is called with the report after every measurement. A section that raises becomes
    a note and the next one runs.
    """
    torch = _optional("torch")
    if torch is None:
        config.contenders = tuple(n for n in config.contenders if not n.startswith("torch"))
    else:
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many as XLA's CPU pool
    malloc = keep_freed_memory() if config.malloc_reuse else "process default"
    target = make_target(config.device, torch is not None)
    if config.smoke:
        target.rotate_bytes = 0  # one input per contender: the smoke run checks the plumbing
    ctx = Context(config, target, progress)
    ctx.report |= {
        "schema": 2,
        "environment": _report.describe(config.device, malloc),
        "config": {key: value for key, value in vars(config).items() if key != "out"},
    }
    ctx.report["config"] |= {  # the defaults resolved
        "sections": config.resolved_sections(),
        "dtypes": config.resolved_dtypes(),
        "budget_s": config.budget(),
        "settle_s": config.settle(),
        "rounds": config.rounds(),
        "rotate_bytes": target.rotate_bytes,
    }
    if torch is None:
        ctx.note("torch is not installed: no torch contenders, no interop section")
    ctx.save = save
    with jax.default_device(target.jax_device):
        for section in config.resolved_sections():
            if ctx.over_time():
                ctx.note(f"--time-limit reached: section {section} skipped")
                continue
            try:
                SECTIONS[section](ctx)
            except Exception as err:
                ctx.note(f"section {section} failed: {type(err).__name__}: {err}"[:300])
    ctx.report["environment"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    ctx.report["elapsed_s"] = time.perf_counter() - ctx.start
    ctx.report["peak_rss_bytes"] = _report.peak_rss_bytes()
    return ctx.report
