"""Command line: ``ptqkit quantize`` and ``ptqkit eval`` (argparse only; everything calls the API)."""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import api, formats
from .evaluation.report import peak_memory_mb
from .models import DEFAULT_MODEL, load_model

log = logging.getLogger("ptqkit")

#: what `ptqkit quantize` runs when no --method is given: the most accurate method measured on the
#: default model (GPTQ W4 g64: +9% perplexity against RTN's +44%, docs/comparison.md)
CLI_METHOD = "gptq"


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    from .jobs.spec import parse_options

    return parse_options(pairs, "--option")


def _add_sym_args(p: argparse.ArgumentParser) -> None:
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")


def _method(text: str) -> Any:
    return text.split(",") if "," in text else text


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (DESIGN.md protocol)")
    g.add_argument("--eval-dataset", default="builtin",
                   help="text to evaluate on: builtin (offline, held out from calibration), wikitext2, c4, pile-val or a file")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    g.add_argument("--max-eval-windows", type=int, default=None, help="evaluate only the first N windows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqkit", description="Post-training quantization for LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, compare it with the original and save it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local HF directory, .gguf file, or the embedded default")
    q.add_argument("--method", default=CLI_METHOD,
                   help="algorithm (rtn, gptq, awq, smoothquant), a comma-separated recipe (smoothquant,gptq) or a YAML recipe")
    q.add_argument("--bits", type=int, default=None, help="weight bits, 2-8 (default: the method's, 4; W8 for smoothquant)")
    q.add_argument("--group-size", type=int, default=None, help="group length along the input dim; -1 = per channel (default 128)")
    _add_sym_args(q)
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. act_order=true, alpha=0.8, damp=0.01)")
    q.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="keep this layer in full precision (full name or re:REGEX), repeatable; lm_head is always kept")
    q.add_argument("--calibration", default="builtin",
                   help="calibration text: builtin (offline), wikitext2, c4, pile-val, or a .txt/.jsonl/.parquet file")
    q.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")
    q.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    q.add_argument("--pipeline", default="sequential", choices=["sequential", "two-pass", "fp-outputs"],
                   help="sequential: one pass per block, each layer sees quantized predecessors; two-pass: less memory; "
                        "fp-outputs: AWQ/SmoothQuant + RTN propagate fp block outputs (AutoAWQ's order, one pass fewer)")
    q.add_argument("--device", default=None, help="where blocks run (cpu, cuda, cuda:1); default: the model's device")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep block inputs/outputs on the host between blocks (models bigger than the device)")
    q.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="model bigger than host memory: accelerate keeps what does not fit on disk here and the "
                        "runner reads it in one block at a time")
    q.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="with --offload-folder: host memory for the model's weights, e.g. 20GiB (default: what is free)")
    q.add_argument("--no-memory-check", action="store_true",
                   help="skip the check of the memory estimate (ptqkit estimate) against free memory")
    q.add_argument("--output", default=None, help="output directory (default ptqkit-out/<method>-w<bits>g<group>)")
    q.add_argument("--format", default="native", choices=sorted(formats.SAVERS), help="checkpoint format")
    q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    q.add_argument("--no-save", action="store_true", help="do not write the quantized model")
    _add_eval_args(q)

    e = sub.add_parser("eval", help="evaluate a model or a saved quantized model against a baseline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default=DEFAULT_MODEL, help="model to evaluate: a quantized checkpoint directory, hub id, directory or .gguf")
    e.add_argument("--baseline", default=None,
                   help="unquantized reference for delta/KL (default: the model a ptqkit checkpoint was made from)")
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    _add_eval_args(e)
    _add_job_parsers(sub)
    _add_estimate_parser(sub)
    return parser


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 4,3), got {text!r}") from err


def _add_job_parsers(sub: Any) -> None:
    """``compare``, ``run`` and ``batch`` (ptqkit.jobs)."""
    c = sub.add_parser("compare", help="compare methods x bits x group sizes under one calibration set and protocol",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local HF directory, .gguf file, or the embedded default")
    c.add_argument("--methods", default="rtn,gptq",
                   help="comma-separated methods; join a recipe's steps with + (smoothquant+gptq); a method's own "
                        "options go in brackets, e.g. rtn,gptq,gptq[act_order=false],awq[sym=false,duo_scaling=true]")
    c.add_argument("--bits", type=_ints, default="4", help="comma-separated weight bits (e.g. 4,3)")
    c.add_argument("--group-size", type=_ints, default="128", help="comma-separated group sizes; -1 = per channel")
    _add_sym_args(c)
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option for every method (a method's brackets override it), repeatable")
    c.add_argument("--ignore", action="append", default=[], metavar="NAME", help="keep this layer in full precision")
    c.add_argument("--calibration", default="builtin", help="calibration text (see quantize)")
    c.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")
    c.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    c.add_argument("--pipeline", default="sequential", choices=["sequential", "two-pass", "fp-outputs"])
    c.add_argument("--device", default=None, help="where blocks run (cpu, cuda)")
    c.add_argument("--output", default="ptqkit-compare", help="directory for results.json, results.md, plots, runs/")
    c.add_argument("--save", default=None, choices=sorted(formats.SAVERS), help="also save every quantized model")
    c.add_argument("--force", action="store_true", help="redo finished combinations")
    c.add_argument("--keep-cache", action="store_true", help="keep the cached unquantized logits after the run")
    _add_eval_args(c)

    r = sub.add_parser("run", help="run one job file (model, calibration, recipe, evaluation, output)")
    r.add_argument("job", help="job YAML file (see examples/recipe.yaml)")
    r.add_argument("--force", action="store_true", help="rerun even if the output holds this finished job")
    r.add_argument("--check", action="store_true", help="only validate the file")

    b = sub.add_parser("batch", help="run a list of jobs; failures are recorded and the batch goes on")
    b.add_argument("jobs", help="batch YAML file (see examples/jobs.yaml)")
    b.add_argument("--index", type=int, default=None, help="run only job N (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    b.add_argument("--force", action="store_true", help="rerun finished jobs")
    b.add_argument("--check", action="store_true", help="only validate the file (and list the jobs)")
    b.add_argument("--summary", default=None, help="write every job's result to this JSON file")


def cmd_compare(args: argparse.Namespace) -> int:
    from . import jobs

    cal = jobs.CalibrationSpec(args.calibration, args.num_samples, args.seqlen, args.seed)
    ev = jobs.EvaluationSpec(args.eval_dataset, args.eval_seqlen, args.max_eval_windows)
    options = _options(args.option)
    if args.sym is not None:
        options["sym"] = args.sym
    res = jobs.compare(args.model, jobs.split_methods(args.methods), args.bits, args.group_size,
                       args.output, cal, ev, options=options, ignore=args.ignore or None, force=args.force,
                       save_format=args.save, batch_size=args.batch_size, pipeline=args.pipeline, device=args.device,
                       keep_cache=args.keep_cache)
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
                             summary=getattr(args, "summary", None))
    for r in results:
        print(jobs.summary_line(r.name, r.row))
    return 1 if any(r.status == "failed" for r in results) else 0


def _table(rep: Any, times: dict[str, float], size_fp: float, size_q: float) -> str:
    f = lambda x, s=".3f": "–" if x is None else format(x, s)  # noqa: E731
    rows = [
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


def cmd_quantize(args: argparse.Namespace) -> int:
    options = _options(args.option)
    for key in ("bits", "group_size", "sym"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    method = _method(args.method)
    from .config import build_recipe

    steps = build_recipe(method, options)  # validate before any model loads
    if args.max_host_memory is not None and args.offload_folder is None:
        raise ValueError("--max-host-memory needs --offload-folder (the weights that do not fit go there)")
    if not args.no_memory_check:
        _memory_check(args, steps)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 evaluates and prints
    times: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(args.model, offload_folder=args.offload_folder, max_host_memory=args.max_host_memory)
    times["load"] = time.perf_counter() - t
    evaluate_fp = not args.no_eval and main_rank
    # the unquantized model to compare with: a copy now, or (offloaded) a second offloaded load afterwards
    baseline = copy.deepcopy(model) if evaluate_fp and not args.offload_folder else None
    size_fp = api.model_size_mb(model)
    t = time.perf_counter()
    api.quantize(model, method, tokenizer=tok, calibration=args.calibration, num_samples=args.num_samples,
                 seqlen=args.seqlen, seed=args.seed, ignore=args.ignore or None, device=args.device,
                 batch_size=args.batch_size, pipeline=args.pipeline,
                 offload_activations=args.offload_activations, **options)
    times["quantize"] = time.perf_counter() - t
    model.ptqkit_info["model"] = args.model
    rep = None
    if evaluate_fp and args.offload_folder:
        baseline, _ = load_model(args.model, offload_folder=Path(args.offload_folder) / "baseline",
                                 max_host_memory=args.max_host_memory)
    if baseline is not None:
        from .evaluation import evaluate

        t = time.perf_counter()
        rep = evaluate(model, tok, baseline=baseline, dataset=args.eval_dataset, seqlen=args.eval_seqlen,
                       max_windows=args.max_eval_windows, device=args.device)
        times["evaluate"] = time.perf_counter() - t
        rep.timings.update({f"{k}_s": v for k, v in times.items()})
        del baseline
    if not main_rank:
        if not args.no_save:  # rank 0 writes; the others wait for it at the barrier inside save
            api.save(model, Path(args.output or "ptqkit-out"), format=args.format, tokenizer=tok)
        return 0
    print(_table(rep, times, size_fp, api.model_size_mb(model)))
    mem = peak_memory_mb()
    print("peak memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    if not args.no_save:
        q = steps[-1].config
        out = Path(args.output or f"ptqkit-out/{'+'.join(s.name for s in steps)}-w{q.bits}g{q.group_size}")
        api.save(model, out, format=args.format, tokenizer=tok, report=rep)  # report: same atomic write
        print(f"saved to {out} ({args.format}); load with ptqkit.load({str(out)!r})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    model, tok = load_model(args.model)
    info = getattr(model, "ptqkit_info", None) or {}
    baseline = args.baseline or info.get("model")
    rep = evaluate(model, tok, baseline=baseline, dataset=args.eval_dataset, seqlen=args.eval_seqlen,
                   max_windows=args.max_eval_windows)
    print(rep.to_markdown())
    if args.json:
        rep.to_json(args.json)
    return 0


def _add_estimate_parser(sub: Any) -> None:
    e = sub.add_parser("estimate", help="peak device and host memory of a quantize run, from the model config alone",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local HF directory or the embedded default")
    e.add_argument("--method", default="gptq", help="algorithm or comma-separated recipe (as for quantize)")
    e.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    e.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    e.add_argument("--pipeline", default="sequential", choices=["sequential", "two-pass"])
    e.add_argument("--device", default="cpu", help="where blocks run (cpu, cuda:0)")
    e.add_argument("--offload-activations", action="store_true", help="block inputs/outputs on the host")
    e.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="a disk-offloaded run (quantize --offload-folder) with this much of the weights in host memory")


def _estimate_kw(args: argparse.Namespace, steps: Any) -> dict[str, Any]:
    kw = dict(method=[s.name for s in steps], num_samples=args.num_samples, seqlen=args.seqlen,
              batch_size=args.batch_size, pipeline=args.pipeline, device=args.device or "cpu",
              offload_activations=args.offload_activations)
    if getattr(args, "offload_folder", None) or args.max_host_memory is not None:  # a disk-offloaded run
        from . import estimate

        kw["host_weights_budget"] = estimate.parse_size(args.max_host_memory) if args.max_host_memory else 0
    return kw


def cmd_estimate(args: argparse.Namespace) -> int:
    from . import estimate
    from .config import build_recipe

    shape = estimate.ModelShape.from_config(estimate.load_config(args.model))
    est = estimate.estimate(shape, **_estimate_kw(args, build_recipe(_method(args.method), {})))
    print(f"{args.model}: {args.method}, {args.num_samples} x {args.seqlen} tokens, batch {args.batch_size}, "
          f"{args.pipeline}{', activations on the host' if args.offload_activations else ''}"
          f"{f', weights on disk beyond {args.max_host_memory}' if args.max_host_memory is not None else ''}")
    print(est.table())
    return 0


def _memory_check(args: argparse.Namespace, steps: Any) -> None:
    """Refuse a run whose estimated peak exceeds free memory (before the model loads)."""
    from . import estimate

    try:
        shape = estimate.ModelShape.from_config(estimate.load_config(args.model))
    except (OSError, ValueError) as e:  # no config to estimate from (e.g. a quantized checkpoint): run anyway
        log.info("memory estimate skipped: %s", e)
        return
    # the unquantized copy kept for the evaluation doubles the model's weights on the host (offloaded: it
    # loads after quantization, when the calibration run's memory is free again)
    extra = 0 if args.no_eval or args.offload_folder else shape.total_params() * 4
    est = estimate.check(shape, extra_host=extra, **_estimate_kw(args, steps))
    log.info("estimated peak memory: %s %.2f GiB, host %.2f GiB", est.device, est.device_peak / estimate.GIB,
             est.host_peak / estimate.GIB)
    if args.offload_folder and args.max_host_memory is None:  # give the weights what the run leaves free
        room = estimate.free_memory(args.device or "cpu")[0] - est.host_peak
        args.max_host_memory = max(room, 0)
        log.info("--max-host-memory %.2f GiB (free memory less the estimated run)", args.max_host_memory / estimate.GIB)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "run": cmd_jobs,
                "batch": cmd_jobs, "estimate": cmd_estimate}[args.command](args)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
