"""Command line: quantize, eval, compare, run, batch, estimate (argparse only; everything calls the API)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import api, checks, distributed, estimate, formats, models, plan
from .calibration import data, host
from .config import build_recipe, grid_label
from .files import check_output
from .cli_options import _Help, _add_estimate_parser, _add_eval, _add_grid, _add_job_parsers, _add_model, _add_run

log = logging.getLogger("ptqkit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqkit", description="Post-training quantization for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, compare it with the original and save it", formatter_class=_Help)
    _add_model(q)
    q.add_argument("--method", default=api.DEFAULT_METHOD,
                   help="algorithm (rtn, gptq, awq, smoothquant), a comma-separated recipe (smoothquant,gptq) "
                        "or a YAML recipe")
    _add_grid(q)
    _add_run(q)
    q.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="model bigger than host memory: accelerate keeps what does not fit on disk here and the "
                        "runner reads it in one block at a time")
    q.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="with --offload-folder: host memory for the model's weights, e.g. 20GiB (default: what is free)")
    q.add_argument("--no-memory-check", action="store_true",
                   help="skip the check of the memory estimate (ptqkit estimate) against free memory")
    q.add_argument("--output", default=None, help="output directory (default ptqkit-out/<model>-<method>-w<bits>g<group>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing ptqkit checkpoint at --output")
    q.add_argument("--format", default="auto", choices=formats.FORMATS,
                   help="checkpoint format; auto: the one the most serving engines read (compressed-tensors where it "
                        "can hold the scheme; docs/serving.md)")
    q.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="float dtype on disk (auto: the dtype the model is published in)")
    q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    q.add_argument("--no-save", action="store_true", help="do not write the quantized model")
    _add_eval(q)

    e = sub.add_parser("eval", help="evaluate a model or a saved quantized model against a baseline", formatter_class=_Help)
    _add_model(e, "model to evaluate (a quantized checkpoint directory too)")
    e.add_argument("--baseline", default=None,
                   help="unquantized reference for delta/KL (default: the model a ptqkit checkpoint was made from)")
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    _add_eval(e)

    c = sub.add_parser("compare", help="compare methods x bits x group sizes under one calibration set and protocol",
                       formatter_class=_Help)
    _add_model(c)
    c.add_argument("--methods", default="rtn,gptq",
                   help="comma-separated methods; join a recipe's steps with + (smoothquant+gptq); a method's own "
                        "options go in brackets, e.g. rtn,gptq,gptq[act_order=false],awq[sym=false,duo_scaling=true]")
    _add_grid(c, many=True)
    _add_run(c)
    c.add_argument("--output", default="ptqkit-compare", help="directory for results.json, results.md, plots, runs/")
    c.add_argument("--save", default=None, choices=formats.FORMATS, help="also save every quantized model")
    c.add_argument("--force", action="store_true", help="redo finished combinations")
    c.add_argument("--keep-cache", action="store_true", help="keep the cached unquantized logits after the run")
    _add_eval(c)

    _add_job_parsers(sub)
    _add_estimate_parser(sub, api.DEFAULT_METHOD)
    return parser


# ------------------------------------------------------------------ commands
def _options(args: argparse.Namespace, grid: bool = True) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs, plus ``--bits/--group-size/--sym`` when given (``grid``)."""
    from .jobs.spec import parse_options

    options = parse_options(args.option, "--option")
    for key in ("bits", "group_size", "sym") if grid else ("sym",):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _table(rep: Any, times: dict[str, float], size_fp: float, size_q: float, share: float | None = None) -> str:
    f = lambda x, s=".3f": "–" if x is None else format(x, s)  # noqa: E731
    rows = [("block weights quantized", "", "–" if share is None else f"{100 * share:.1f}%"),
        ("perplexity", f(rep.ppl_fp if rep else None), f(rep.ppl_q if rep else None)),
        ("Δ ppl (Δ%)", "", "–" if rep is None or rep.delta is None else f"{rep.delta:+.3f} ({rep.delta_pct:+.2f}%)"),
        ("KL (nats/token)", "", f(rep.kl if rep else None, ".5f")),
        ("top-1 agreement", "", f(rep.top1 if rep else None, ".4f")),
        ("size (MB)", f"{size_fp:.1f}", f"{size_q:.1f}"),
    ] + [(f"time {k} (s)", "", f"{v:.1f}") for k, v in times.items()]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}} | {'fp':>12} | {'quantized':>22}", "-" * (w + 42)]
    lines += [f"{a:<{w}} | {b:>12} | {c:>22}" for a, b, c in rows]
    return "\n".join(lines)


def _estimate_kw(args: argparse.Namespace, steps: Any, host_budget: int | None = None) -> dict[str, Any]:
    kw = dict(method=steps, num_samples=args.num_samples, seqlen=args.seqlen, batch_size=args.batch_size,
              pipeline=args.pipeline, device=args.device or "cpu",
              offload_activations=args.offload_activations)
    if getattr(args, "offload_folder", None) or args.max_host_memory is not None:  # a disk-offloaded run
        kw["host_weights_budget"] = host_budget or 0
    return kw


def _memory_check(args: argparse.Namespace, steps: Any, host_budget: int | None, shape: Any) -> int | None:
    """Refuse a run whose estimated peak exceeds free memory (before the model loads); returns the host
    memory for a disk-offloaded model's weights (what the run leaves free, unless given)."""
    # the unquantized copy kept for the evaluation doubles the model's weights on the host (offloaded: it
    # loads after quantization, when the calibration run's memory is free again)
    extra = 0 if args.no_eval or args.offload_folder else shape.total_params() * 4
    est = plan.check(shape, extra_host=extra, **_estimate_kw(args, steps, host_budget))
    log.info("estimated peak memory: %s %.2f GiB, host %.2f GiB", est.device, est.device_peak / estimate.GIB,
             est.host_peak / estimate.GIB)
    if args.offload_folder and host_budget is None:
        host_budget = max(estimate.free_memory(args.device or "cpu")[0] - est.host_peak, 0)
        log.info("--max-host-memory %.2f GiB (free memory less the estimated run)", host_budget / estimate.GIB)
    return host_budget


def _model_name(model: str) -> str:
    """A directory-name form of the model: ``smollm2-135m``, ``org--name``, a path's last part."""
    p = Path(model)
    name = p.stem if p.suffix == ".gguf" else (p.name if p.exists() or model.startswith((".", "/", "~")) else model)
    return name.replace("/", "--") or "model"


def _check_eval(args: argparse.Namespace) -> None:
    if args.eval_seqlen < 2:
        raise ValueError(f"--eval-seqlen {args.eval_seqlen}: a window needs at least 2 tokens (one to predict)")
    checks.check_positive(max_eval_windows=args.max_eval_windows)
    data.check_source(args.eval_dataset, "--eval-dataset")


def _servable_groups(method: Any, options: dict[str, Any], steps: list, shape: Any) -> list:
    """The grid with the default group size, or, when the model's widths are not multiples of it, the largest
    of 128 / 64 / 32 that divides them all (a checkpoint engines read needs whole groups)."""
    q = steps[-1].config
    widths = {k for k, _ in shape.linear_shapes().values()}
    if q.activations or q.group_size == -1 or all(k % q.group_size == 0 for k in widths):
        return steps
    size = next((g for g in (128, 64, 32) if all(k % g == 0 for k in widths)), None)
    if size is None:
        return steps
    log.info("group size %d: the model's widths %s are multiples of it (not of %d)", size, sorted(widths), q.group_size)
    options["group_size"] = size
    return build_recipe(method, options)


def _plan(args: argparse.Namespace) -> tuple[Any, dict[str, Any], list, Path, int | None]:
    """Everything that can be checked before the model loads: the recipe and its options, devices, sizes,
    evaluation settings, the output and whether the format can hold the grid, free memory."""
    method, options = args.method, _options(args)
    steps = build_recipe(method, options)
    checks.check_device(args.device)
    checks.check_positive(num_samples=args.num_samples, seqlen=args.seqlen, batch_size=args.batch_size)
    checks.check_ignore(args.ignore or None)
    data.check_source(args.calibration, "--calibration")
    if not args.no_eval:
        _check_eval(args)
    if args.max_host_memory is not None and args.offload_folder is None:
        raise ValueError("--max-host-memory needs --offload-folder (the weights that do not fit go there)")
    budget = None if args.max_host_memory is None else estimate.parse_size(args.max_host_memory, "--max-host-memory")
    try:  # the model's shape from its config alone (none to read, e.g. a quantized checkpoint: no checks)
        shape = estimate.ModelShape.from_config(estimate.load_config(args.model))
    except (OSError, ValueError) as e:
        log.info("no model config to check against: %s", e)
        shape = None
    if shape is not None and args.group_size is None and "group_size" not in options:
        steps = _servable_groups(method, options, steps, shape)
    q = steps[-1].config
    out = Path(args.output or f"ptqkit-out/{_model_name(args.model)}-{'+'.join(s.name for s in steps)}-{grid_label(q)}")
    if not args.no_save:
        source = models.resolve_model_path(args.model)
        check_output(out, args.overwrite, [source] if Path(source).is_dir() else [], "--output")
        if shape is not None:
            formats.check_plan(args.format, q, shape.linear_shapes())
    if not args.no_memory_check and shape is not None:  # no shape: nothing to estimate from, run anyway
        budget = _memory_check(args, steps, budget, shape)
    return method, options, steps, out, budget


def cmd_quantize(args: argparse.Namespace) -> int:
    method, options, steps, out, budget = _plan(args)
    main_rank = distributed.env_rank() == 0  # under torchrun only rank 0 evaluates and prints
    times: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = api.load_model(args.model, offload_folder=args.offload_folder, max_host_memory=budget)
    times["load"] = time.perf_counter() - t
    evaluate_fp = not args.no_eval and main_rank
    calib = None  # read (and for text: tokenized) before the long part: a bad source fails here
    if any(s.needs_data for s in steps):
        calib = data.load_calibration(args.calibration, tok, num_samples=args.num_samples, seqlen=args.seqlen,
                                      seed=args.seed)
    eval_ids = data.load_eval_ids(args.eval_dataset, tok) if evaluate_fp else None
    # the unquantized model to compare with: a copy now, or (offloaded) a second offloaded load afterwards
    baseline = copy.deepcopy(model) if evaluate_fp and not args.offload_folder else None
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    disk_dtype = dtype or getattr(model, "ptqkit_source_dtype", None)  # sizes as written
    size_fp = api.model_size_mb(model, disk_dtype)
    t = time.perf_counter()
    api.quantize(model, method, tokenizer=tok, calibration=calib, seed=args.seed, ignore=args.ignore or None,
                 device=args.device, batch_size=args.batch_size, pipeline=args.pipeline,
                 offload_activations=args.offload_activations, num_samples=args.num_samples, seqlen=args.seqlen,
                 **options)
    times["quantize"] = time.perf_counter() - t
    model.ptqkit_info["model"] = args.model
    if evaluate_fp and args.offload_folder:
        baseline, _ = api.load_model(args.model, offload_folder=Path(args.offload_folder) / "baseline",
                                     max_host_memory=budget)
    rep = None
    if baseline is not None:
        from .evaluation import evaluate

        t = time.perf_counter()
        rep = evaluate(model, tok, baseline=baseline, dataset=eval_ids, seqlen=args.eval_seqlen,
                       max_windows=args.max_eval_windows, device=args.device)
        rep.protocol["dataset"] = str(args.eval_dataset)
        times["evaluate"] = time.perf_counter() - t
        rep.timings.update({f"{k}_s": v for k, v in times.items()})
    del baseline
    if main_rank:
        print(_table(rep, times, size_fp, api.model_size_mb(model, disk_dtype),
                     model.ptqkit_info["coverage"]["quantized_share"]))
        print("peak memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in estimate.peak_memory_mb().items()))
    if not args.no_save:  # rank 0 writes, the report in the same atomic write; the others wait at save's barrier
        api.save(model, out, format=args.format, tokenizer=tok, report=rep, overwrite=args.overwrite,
                 dtype=dtype)
        if main_rank:
            print(f"saved to {out} ({formats.served_by(model, out)}; docs/serving.md); ptqkit.load({str(out)!r}) reads it")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    _check_eval(args)
    model, tok = api.load_model(args.model)
    info = getattr(model, "ptqkit_info", None) or {}
    rep = evaluate(model, tok, baseline=args.baseline or info.get("model"), dataset=args.eval_dataset,
                   seqlen=args.eval_seqlen, max_windows=args.max_eval_windows)
    print(rep.to_markdown())
    if args.json:
        rep.to_json(args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import jobs

    checks.check_device(args.device)
    data.check_source(args.calibration, "--calibration")
    _check_eval(args)

    cal = jobs.CalibrationSpec(args.calibration, args.num_samples, args.seqlen, args.seed)
    ev = jobs.EvaluationSpec(args.eval_dataset, args.eval_seqlen, args.max_eval_windows)
    res = jobs.compare(args.model, jobs.split_methods(args.methods), args.bits, args.group_size,
                       args.output, cal, ev, options=_options(args, grid=False), ignore=args.ignore or None,
                       force=args.force, save_format=args.save, batch_size=args.batch_size, pipeline=args.pipeline,
                       device=args.device, keep_cache=args.keep_cache)
    print((Path(args.output) / jobs.RESULTS_MD).read_text())
    return 1 if any(res["runs"][k]["status"] != "done" for k in res["current"]) else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from . import jobs

    specs = jobs.load_jobs(args.job if args.command == "run" else args.jobs)
    if args.command == "run" and len(specs) != 1:
        raise ValueError(f"{args.job} holds {len(specs)} jobs: run it with `ptqkit batch` (and --index N for one)")
    if args.check:
        for i, j in enumerate(specs):
            print(f"{i}: {j.name} ({j.at()}) -> {j.output.dir}")
        return 0
    results = jobs.run_batch(specs, index=getattr(args, "index", None), force=args.force,
                             summary=getattr(args, "summary", None), overwrite=args.overwrite)
    for r in results:
        print(jobs.summary_line(r.name, r.row))
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from .jobs.spec import parse_options

    budget = None if args.max_host_memory is None else estimate.parse_size(args.max_host_memory, "--max-host-memory")
    models.check_weight_files(models.resolve_model_path(args.model))  # a damaged download fails here, not later
    shape = estimate.ModelShape.from_config(estimate.load_config(args.model))
    steps = build_recipe(args.method, parse_options(args.option, "--option"))
    kw = _estimate_kw(args, steps, budget)
    host_free, dev_free = estimate.free_memory(kw["device"])
    opts = plan.options(shape, kw, host_free, dev_free)
    if kw["pipeline"] == "auto":
        mode = plan.pick(opts)[0]
        kw.update(mode.settings, offload_activations=mode.offload_activations or args.offload_activations)
    run = plan.mode_name(kw["pipeline"], kw["offload_activations"])
    print(f"{args.model}: {args.method}, {args.num_samples} x {args.seqlen} tokens, batch {args.batch_size}, "
          f"{f'auto: {run}' if args.pipeline == 'auto' else run}"
          f"{f', weights on disk beyond {args.max_host_memory}' if args.max_host_memory is not None else ''}")
    print(estimate.estimate(shape, **kw).table())
    print("\nevery pipeline (auto takes the fastest that fits):")
    print(plan.table(opts, host_free, dev_free))
    return 0


# errors ptqkit raises with a message meant for the user (named after the problem and its fix)
_OURS = (ValueError, FileNotFoundError, MemoryError, ConnectionError, FloatingPointError)
COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "run": cmd_jobs, "batch": cmd_jobs,
            "estimate": cmd_estimate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure reaches the user as one line and exit status 2 (``--debug``: traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ptqkit").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        checks.check_env()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        log.error("interrupted (what was complete before is kept; nothing is half-written)")
        return 130
    except Exception as e:  # noqa: BLE001 - every failure a user can cause, as one line
        if args.debug:
            raise
        msg = str(e).strip() or type(e).__name__
        log.error("%s%s (--debug shows the traceback)", "" if isinstance(e, _OURS) else f"{type(e).__name__}: ", msg)
        return 2


def entry() -> None:
    """The ``ptqkit`` command: tunes its own process (jemalloc where installed, else one glibc arena; huge pages:
    ``calibration/host.py``), then runs."""
    with contextlib.suppress(ValueError):  # a bad PTQKIT_MALLOC_TUNE: main() reports it, after --help had its chance
        host.tune_command()
    sys.exit(main())


if __name__ == "__main__":
    entry()
