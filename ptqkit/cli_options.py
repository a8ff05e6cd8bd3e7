"""The command line's option groups, each defined once and shared by the commands (``ptqkit.cli``)."""
from __future__ import annotations

import argparse
from typing import Any

from .calibration.runner import PIPELINES
from .models import DEFAULT_MODEL


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 4,3), got {text!r}") from err


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where one means something (not for flags, None or an empty list) and the help
    does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model(p: argparse.ArgumentParser, what: str = "model to quantize") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{what}: hub id, local HF directory, .gguf file, or the embedded model")


def _add_grid(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The weight grid and the options routed to the recipe's steps."""
    if many:
        p.add_argument("--bits", type=_ints, default="4", help="comma-separated weight bits (e.g. 4,3)")
        p.add_argument("--group-size", type=_ints, default="128", help="comma-separated group sizes; -1 = per channel")
    else:
        p.add_argument("--bits", type=int, default=None, help="weight bits, 2-8 (default 4; 8 for smoothquant)")
        p.add_argument("--group-size", type=int, default=None,
                       help="group length along the input dim; -1 = per channel (default 128, or 64/32 where the "
                            "model's widths are not multiples of 128: engines need whole groups)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, repeatable (e.g. act_order=true, alpha=0.8, damp=0.01)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="keep this layer in full precision (full name or re:REGEX), repeatable; lm_head is always kept")


def _add_run(p: argparse.ArgumentParser, data: bool = True) -> None:
    """How the calibration runs (``data``: with the calibration source and seed)."""
    if data:
        p.add_argument("--calibration", default="builtin",
                       help="calibration text: builtin (offline), wikitext2, c4, pile-val, or a .txt/.jsonl/.parquet file")
        p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    p.add_argument("--pipeline", default="auto", choices=PIPELINES,
                   help="auto: the fastest that fits in free memory (ptqkit estimate lists them); sequential: one "
                        "pass per block, each layer sees quantized predecessors; two-pass: one batch's activations, "
                        "statistics from the fp block; fp-outputs: AWQ/SmoothQuant + RTN propagate fp block outputs "
                        "(AutoAWQ's order)")
    p.add_argument("--device", default=None, help="where blocks run (cpu, cuda, cuda:1); default: the model's device")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep block inputs/outputs on the host between blocks (models bigger than the device)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (docs/comparison.md protocol)")
    g.add_argument("--eval-dataset", default="builtin",
                   help="text to evaluate on: builtin (offline, held out from calibration), wikitext2, c4, pile-val or a file")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="window length in tokens")
    g.add_argument("--max-eval-windows", type=int, default=None, help="evaluate only the first N windows")


def _add_job_parsers(sub: Any) -> None:
    r = sub.add_parser("run", help="run one job file (model, calibration, recipe, evaluation, output)")
    r.add_argument("job", help="job YAML file (see examples/recipe.yaml)")
    r.add_argument("--force", action="store_true", help="rerun even if the output holds this finished job (replaces it)")
    r.add_argument("--overwrite", action="store_true", help="replace an output that holds another ptqkit job")
    r.add_argument("--check", action="store_true", help="only validate the file")
    b = sub.add_parser("batch", help="run a list of jobs; failures are recorded and the batch goes on")
    b.add_argument("jobs", help="batch YAML file (see examples/jobs.yaml)")
    b.add_argument("--index", type=int, default=None, help="run only job N (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    b.add_argument("--force", action="store_true", help="rerun finished jobs (replaces their outputs)")
    b.add_argument("--overwrite", action="store_true", help="replace outputs that hold other ptqkit jobs")
    b.add_argument("--check", action="store_true", help="only validate the file (and list the jobs)")
    b.add_argument("--summary", default=None, help="write every job's result to this JSON file")


def _add_estimate_parser(sub: Any, default_method: str) -> None:
    s = sub.add_parser("estimate", help="peak device and host memory of a quantize run, from the model config alone",
                       formatter_class=_Help)
    _add_model(s)
    s.add_argument("--method", default=default_method, help="algorithm or comma-separated recipe (as for quantize)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option that changes memory, repeatable (e.g. gptaq=true)")
    _add_run(s, data=False)
    s.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="a disk-offloaded run (quantize --offload-folder) with this much of the weights in host memory")
