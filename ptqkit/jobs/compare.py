"""``ptqkit compare``: methods x bits x group sizes under one calibration set and one protocol.

One calibration set (fingerprinted) serves every combination; the unquantized model is evaluated
once and its logits are cached on disk and replayed for every combination's KL / top-1. A method may
carry its own options for ablations (``gptq[act_order=false]``): they show in its label and results
and are part of the key that a rerun's skip logic compares.
``results.json`` is rewritten atomically after each finished combination, so a rerun skips them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import api
from .. import evaluation as _evaluation
from ..calibration.data import load_calibration, load_eval_ids
from ..config import build_recipe, grid_label
from ..estimate import PeakMemory
from ..evaluation.plots import plot_ppl_by_bits, plot_size_vs_ppl
from ..files import atomic_dir, atomic_file, read_json, write_json, write_text
from ..models import DEFAULT_MODEL
from .run import _digest, _row, summary_line
from .spec import CalibrationSpec, EvaluationSpec, SpecError, parse_options

log = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PLOT_BITS, PLOT_SIZE = "ppl_by_bits.png", "size_vs_ppl.png"
GRID_OPTIONS = ("bits", "group_size")  # set by the comparison's grid, not per method
CACHE_DIR = ".ptqkit-cache"  # the unquantized logits, under a name only ptqkit uses


# ----------------------------------------------------------------------------- method specs
def split_methods(text: str) -> list[str]:
    """Split ``--methods`` on the commas outside brackets: ``"rtn,gptq[act_order=false,damp=0.1]"``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"--methods {text!r}: unbalanced or nested brackets at character {i + 1}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"--methods {text!r}: a '[' is not closed")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _options_text(options: dict[str, Any] | None, sep: str = ",") -> str:
    """``act_order=false,damp=0.1``: booleans and null as typed on the command line."""
    text = (f"{k}={json.dumps(v) if isinstance(v, bool) or v is None else v}" for k, v in (options or {}).items())
    return sep.join(text)


def parse_method(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"gptq[act_order=false]"`` -> (canonical name, recipe ``"gptq"``, its own options ``{"act_order": False}``).

    Options in brackets apply to that method only, on top of the options every method gets.
    """
    m = re.fullmatch(r"\s*([^\[\],]+?)\s*(?:\[([^\[\]]*)\])?\s*", spec)
    if not m:
        raise ValueError(f"method {spec!r}: write NAME or NAME[key=value,...], e.g. gptq[act_order=false]")
    recipe, opts = m[1], parse_options([p for p in (m[2] or "").split(",") if p.strip()], f"method {spec!r}")
    grid = [k for k in GRID_OPTIONS if k in opts]
    if grid:
        raise ValueError(f"method {spec!r}: {grid} come from --bits/--group-size (the comparison's grid), "
                         "not from a method's brackets")
    if not opts:
        return recipe, recipe, {}
    return f"{recipe}[{_options_text(opts)}]", recipe, opts


# ----------------------------------------------------------------------------- compare
@dataclass
class Combination:
    method: str  # as given, canonical: "gptq", "smoothquant+gptq", "gptq[act_order=false]"
    label: str  # e.g. "gptq-w4g128", "gptq[act_order=false]-w4g64", "smoothquant-w8a8"
    options: dict[str, Any]  # everything passed to ptqkit.quantize (bits, group_size, method options included)
    bits: int
    group_size: int
    recipe: str  # the method without its options: a registry name or a "+"-joined recipe
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's own (brackets)


def plan(methods: Sequence[str], bits: Sequence[int], group_sizes: Sequence[int],
         options: dict[str, Any] | None = None) -> list[Combination]:
    """Every method x bits x group size, validated (``build_recipe``) before any model loads.

    A method may carry its own options in brackets (``gptq[act_order=false]``, see :func:`parse_method`),
    applied on top of ``options``. A recipe whose quantizer is W8A8 (SmoothQuant) fixes its grid: it
    runs once at that grid.
    """
    combos, problems, parsed = [], [], {}
    for spec in methods:
        try:
            name, recipe, own = parse_method(spec)
        except ValueError as e:
            problems.append(str(e))
            continue
        parsed.setdefault(name, (recipe, own))  # each method once, in the order given
    for m, (recipe, own) in parsed.items():
        base = {**(options or {}), **own}
        try:
            q, base_error = build_recipe(recipe, base)[-1].config, None
        except ValueError as e:  # may hold on the grid (rtn[activations=dynamic] needs bits=8): see below
            q, base_error = None, str(e)
        if q is not None and getattr(q, "activations", None) is not None:
            log.info("%s quantizes W8A8 (8-bit per-channel weights): it runs once, whatever --bits/--group-size", m)
            combos.append(Combination(m, f"{m}-w8a8", base, q.bits, q.group_size, recipe, own))
            continue
        errors = []  # (bits, group_size, message) of the grid points that do not build
        for b in bits:
            for g in group_sizes:
                opts = {**base, "bits": b, "group_size": g}
                try:
                    label = f"{m}-{grid_label(build_recipe(recipe, opts)[-1].config)}"
                except ValueError as e:
                    errors.append((b, g, str(e)))
                    continue
                combos.append(Combination(m, label, opts, b, g, recipe, own))
        if base_error is not None and errors and all(msg == base_error for _, _, msg in errors):
            problems.append(f"method {m!r}: {base_error}")  # not about the grid: say it once
        else:
            problems += [f"method {m!r} at bits={b}, group_size={g}: {msg}" for b, g, msg in errors]
    if problems:
        raise SpecError(problems, "comparison")
    return combos


class CachedBaseline(nn.Module):
    """The unquantized model's logits per evaluation window, computed once and stored in ``directory``
    (fp32 safetensors, keyed by the window's token ids), then replayed for every combination's KL /
    top-1. Exact: the replayed tensors are the very logits a fresh forward would give."""

    def __init__(self, model: nn.Module, directory: Path) -> None:
        super().__init__()
        self.model, self.directory = model, Path(directory)
        self.config = getattr(model, "config", None)
        self.hits = 0

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        path = self.directory / f"{_digest(input_ids.cpu().tolist())}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_file(str(path))["logits"].to(input_ids.device)
        out = self.model(input_ids, **kwargs)
        logits = out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]
        with atomic_file(path) as tmp:
            save_file({"logits": logits.detach().float().cpu().contiguous()}, str(tmp))
        return logits


@dataclass
class _Setup:
    """What every combination of one ``compare`` run shares."""

    model: str
    fp: nn.Module
    tok: Any
    calib: Any  # CalibrationSet
    eval_ids: torch.Tensor  # [T], tokenized once
    ev: EvaluationSpec
    baseline: CachedBaseline
    quantize_kw: dict[str, Any]

    def evaluate(self, model: nn.Module, baseline: nn.Module | None = None) -> Any:
        rep = _evaluation.evaluate(model, self.tok, baseline=baseline, dataset=self.eval_ids, seqlen=self.ev.seqlen,
                                   max_windows=self.ev.max_windows, device=self.quantize_kw["device"])
        rep.protocol["dataset"] = self.ev.dataset
        return rep


def _run_combination(s: _Setup, c: Combination, out: Path, save_format: str | None) -> dict[str, Any]:
    """Quantize a copy of the fp model, evaluate it against the cached baseline, write ``runs/<label>``."""
    q = copy.deepcopy(s.fp)
    with PeakMemory() as mem:
        t = time.perf_counter()
        api.quantize(q, c.recipe, tokenizer=s.tok, calibration=s.calib, num_samples=len(s.calib),
                     seqlen=s.calib.seqlen, **s.quantize_kw, **c.options)
        quant_s = time.perf_counter() - t
    q.ptqkit_info["model"] = s.model
    rep = s.evaluate(q, baseline=s.baseline)
    # per-block wall times and per-layer facts (damp, α, outlier ratios, ...) go with each run
    rep.extra.update(blocks=q.ptqkit_info.get("blocks", []), layers=q.ptqkit_info.get("layers", {}))
    with atomic_dir(out) as tmp:
        if save_format:
            api.save(q, tmp, format=save_format, tokenizer=s.tok, report=rep)
        rep.to_json(tmp / "report.json")
    return _row(rep, q, quant_s, mem)


def _previous(out: Path) -> dict[str, Any]:
    """``results.json`` of an earlier comparison in ``out`` (a rerun skips its finished combinations); a
    ``results.json`` that is not ptqkit's, or an ``out`` that is the current directory, is refused."""
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ValueError(f"--output {out} is the current directory or one above it: give a directory of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is an existing file: give a directory path")
    results = read_json(out / RESULTS_JSON) or {}
    if not isinstance(results, dict) or (results and not {"runs", "baselines"} <= set(results)):
        raise ValueError(f"{out / RESULTS_JSON} exists and is not a ptqkit comparison: use another --output")
    if not results and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--output {out} holds other files and no earlier comparison: use a new directory")
    return results or {"runs": {}, "baselines": {}}  # a non-empty one has both (checked above)


def _run_one(s: _Setup, c: Combination, key: str, results: dict[str, Any], out: Path, save_format: str | None,
             force: bool) -> None:
    """One combination (skipped when done), its row recorded in ``results.json`` at once."""
    prev = results["runs"].get(key)
    if prev and prev.get("status") == "done" and not force:
        log.info("%s", summary_line(c.label, {**prev, "status": "skipped: already done"}))
        return
    meta = {"label": c.label, "method": c.method, "recipe": c.recipe, "method_options": c.method_options,
            "bits": c.bits, "group_size": c.group_size, "options": c.options}
    try:
        row = {**meta, **_run_combination(s, c, out / "runs" / c.label, save_format)}
    except Exception as e:  # noqa: BLE001  (a failed combination is recorded; the others go on)
        log.debug("%s failed", c.label, exc_info=True)
        row = {**meta, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    results["runs"][key] = row
    write_json(out / RESULTS_JSON, results)  # after every combination: a rerun skips it
    (log.error if row["status"] == "failed" else log.info)("%s", summary_line(c.label, row))


def compare(model: str | tuple[nn.Module, Any] = DEFAULT_MODEL, methods: Sequence[str] = ("rtn",),
            bits: Sequence[int] = (4,), group_sizes: Sequence[int] = (128,),
            output: str | os.PathLike = "ptqkit-compare",
            calibration: CalibrationSpec | None = None, evaluation: EvaluationSpec | None = None,
            options: dict[str, Any] | None = None, ignore: list[str] | None = None, force: bool = False,
            save_format: str | None = None, batch_size: int = 8, pipeline: str = "auto",
            device: str | None = None, keep_cache: bool = False) -> dict[str, Any]:
    """Compare methods under one calibration set and one evaluation protocol; returns ``results.json``'s content.

    ``model`` is a name for ``ptqkit.load_model`` or a loaded ``(model, tokenizer)`` (left unchanged).
    ``methods``: registry names or ``+``-joined recipes, each optionally with its own options in
    brackets (``"gptq[act_order=false]"``, applied on top of ``options``; see :func:`plan`).
    Writes ``results.json`` (after every finished combination), ``results.md``, ``ppl_by_bits.png``,
    ``size_vs_ppl.png`` and ``runs/<label>/report.json`` (+ the checkpoint with ``save_format``).
    Finished combinations (same model, method, grid, options, calibration fingerprint, protocol)
    are skipped unless ``force``; failed ones are recorded and retried on the next run.
    """
    cal, ev = calibration or CalibrationSpec(), evaluation or EvaluationSpec()
    combos = plan(methods, bits, group_sizes, options)  # every combination validated before the model loads
    out = Path(output)
    results = _previous(out)
    fp, tok = api.load_model(model) if isinstance(model, (str, os.PathLike)) else model
    model = str(model) if isinstance(model, (str, os.PathLike)) else fp.config._name_or_path or type(fp).__name__
    calib = load_calibration(cal.source, tok, num_samples=cal.num_samples, seqlen=cal.seqlen, seed=cal.seed)
    weights = _digest([(n, float(p.double().sum()), list(p.shape)) for n, p in fp.state_dict().items()])
    bkey = _digest([model, weights, dataclasses.asdict(ev)])
    s = _Setup(model, fp, tok, calib, load_eval_ids(ev.dataset, tok), ev,
               CachedBaseline(fp, out / CACHE_DIR / f"fp-logits-{bkey}"),
               dict(seed=cal.seed, ignore=ignore, device=device, batch_size=batch_size, pipeline=pipeline))
    if bkey not in results["baselines"] or force:
        t = time.perf_counter()
        rep = s.evaluate(s.baseline)  # the fp model, once: its logits stay in the cache
        results["baselines"][bkey] = {"ppl": rep.ppl_q, "size_mb": api.model_size_mb(fp), "protocol": rep.protocol,
                                      "eval_s": time.perf_counter() - t}
    base = results["baselines"][bkey]
    results.update(model=model, baseline=bkey, versions=_evaluation.versions(), evaluation=dataclasses.asdict(ev),
                   calibration={**dataclasses.asdict(cal), "fingerprint": calib.fingerprint,
                                "description": calib.source},
                   settings={"options": options or {}, "ignore": ignore, "pipeline": pipeline,
                             "batch_size": batch_size})
    keys = [_digest([model, c.method, c.options, calib.fingerprint, bkey, ignore, pipeline]) for c in combos]
    results["current"] = keys  # this run's combinations (results.json keeps older ones too)
    write_json(out / RESULTS_JSON, results)
    for c, key in tqdm(list(zip(combos, keys)), desc="compare", unit="run"):
        _run_one(s, c, key, results, out, save_format, force)
    rows = [results["runs"][k] for k in keys]
    write_text(out / RESULTS_MD, results_markdown(results, rows))
    done = [r for r in rows if r["status"] == "done"]
    plot_ppl_by_bits(done, base["ppl"], out / PLOT_BITS)
    plot_size_vs_ppl(done, base["ppl"], base["size_mb"], out / PLOT_SIZE)
    if len(done) == len(rows) and not keep_cache:  # only the cache this run owns: its own name, its own key
        shutil.rmtree(s.baseline.directory, ignore_errors=True)
        if (out / CACHE_DIR).is_dir() and not any((out / CACHE_DIR).iterdir()):
            (out / CACHE_DIR).rmdir()
    return results


def results_markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The comparison table with the protocol it was measured under."""
    base = results["baselines"][results["baseline"]]
    cal, proto = results["calibration"], base["protocol"]
    f = lambda x, s: "–" if x is None else format(x, s)  # noqa: E731
    lines = [
        f"# {results['model']}: method comparison", "",
        f"- calibration: `{cal['description']}`, {cal['num_samples']} x {cal['seqlen']} tokens, "
        f"fingerprint `{cal['fingerprint'][:16]}`",
        f"- evaluation: {proto['dataset']}, {proto['windows']} windows x {proto['seqlen']} tokens "
        f"({proto['scored_tokens']} scored), max_windows={results['evaluation']['max_windows']}",
        f"- unquantized: ppl {base['ppl']:.4f}, {base['size_mb']:.1f} MB",
        f"- options for every method: {_options_text(results['settings'].get('options'), ', ') or 'none'}; "
        "a method's own options are in its brackets",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), "",
        "| method | bits | group | ppl | Δ | Δ% | KL | top-1 % | quantize (s) | peak mem (MiB) | size (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = "per-channel" if r["group_size"] == -1 else r["group_size"]
        if r["status"] != "done":
            err = str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:100]
            lines.append(f"| {r['method']} | {r['bits']} | {g} | failed: {err} | | | | | | | |")
            continue
        top1 = None if r["top1"] is None else 100 * r["top1"]
        lines.append(f"| {r['method']} | {r['bits']} | {g} | {f(r['ppl'], '.4f')} | {f(r['delta'], '+.4f')} "
                     f"| {f(r['delta_pct'], '+.2f')} | {f(r['kl'], '.5f')} | {f(top1, '.2f')} | {r['quantize_s']:.1f} "
                     f"| {r['peak_mem_mb']:.0f} | {r['size_mb']:.1f} |")
    lines += ["", "KL: mean KL(fp ‖ quantized) per token, nats. Peak memory: process RSS above its level "
              "before quantizing (sampled every 20 ms). Size: parameters and buffers in memory, MB of 2^20 bytes.", ""]
    return "\n".join(lines)
