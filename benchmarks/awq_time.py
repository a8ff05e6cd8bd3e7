"""Wall time, peak memory and quality of AWQ (+RTN) on SmolLM2-135M, per block and in total.

    python benchmarks/awq_time.py                                   # AWQ W4 g64 asym, 128 x 512 builtin tokens
    python benchmarks/awq_time.py --bits 3 --eval-windows 17        # W3 g64 asym, with ppl / KL on the eval split
    python benchmarks/awq_time.py --variants rtn,scale,clip,both,duo --eval-windows 17 --json out.json

Each variant runs in a fresh child process (so peak memory is its own): the model is loaded, then
``ptqkit.quantize`` runs on the same calibration ids. Variants: ``rtn`` (no AWQ), ``scale`` (scale
search only), ``clip`` (clip search only), ``both`` (the defaults), ``duo`` (both, duo scaling on),
``noduo`` (both, duo scaling off). ``--option key=value`` passes more AWQ options to every AWQ variant.
The AWQ time per block is split into the observe statistics, the scale search, the clip search and
the rest (the forward passes and RTN).

``--compare-llmcompressor`` adds a row for llm-compressor's AWQ, run by ``--llmc-python`` (default:
this interpreter; it must import ``llmcompressor`` and ``ptqkit``) in its own child on the same
calibration ids: ``oneshot`` with llm-compressor's ``AWQModifier`` (its default ``duo_scaling``
and ``n_grid``; it has no clip search) and a ``QuantizationModifier`` on the same grid (``--bits``,
``--group-size``, asymmetric unless ``--sym``; every Linear but ``lm_head``), sequential pipeline,
batch size ``--llmc-batch-size``. Its model keeps float weights and fake-quantizes them (QDQ from
its ``weight_scale`` / ``weight_zero_point``) in every forward; it is evaluated like the ptqkit
variants, and the child checks that the evaluated forward really uses at most ``2**bits`` levels
per group. Patch: llm-compressor 0.14's AWQ pins its cached block inputs before each mapping's
grid search (``IntermediatesCache.pin_memory``), and ``Tensor.pin_memory()`` needs an accelerator,
so on a machine without one ``oneshot`` dies at the first mapping with "RuntimeError: Cannot
access accelerator device when none is available."; the child makes that pinning a no-op when
no accelerator is present (pinning only speeds up host-to-device copies, so nothing else changes).

    python benchmarks/awq_time.py --variants both,duo --eval-windows 17 --compare-llmcompressor \\
        --llmc-python /path/to/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

MARK = "@@RESULT@@ "
VARIANTS: dict[str, dict[str, Any] | None] = {
    "rtn": None,
    "scale": {"clip_search": False},
    "clip": {"scale_search": False},
    "both": {},
    "duo": {"duo_scaling": True},
    "noduo": {"duo_scaling": False},
}


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option {text!r}: use key=value, e.g. n_grid=10")
    low = value.lower()
    if low in ("true", "false", "none"):
        return key, None if low == "none" else low == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def child(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    import ptqkit
    from ptqkit.calibration.data import load_calibration

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ptqkit.estimate import PeakMemory

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    model = copy.deepcopy(base)
    extra = VARIANTS[args.child]
    method = "rtn" if extra is None else [{"method": "awq", **dict(args.option), **extra}, "rtn"]
    out: dict[str, Any] = {"variant": args.child, "method": method, "bits": args.bits, "group_size": args.group_size,
                           "sym": args.sym, "samples": args.samples, "seqlen": args.seqlen,
                           "calibration_fingerprint": calib.fingerprint}
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ptqkit.quantize(model, method, calibration=calib, bits=args.bits, group_size=args.group_size, sym=args.sym,
                        batch_size=args.batch_size)
        out["total_s"] = time.perf_counter() - t0
    info = model.ptqkit_info
    blocks = []
    for b in info["blocks"]:
        st = info["layers"].get(f"model.layers.{b['index']}.awq", {})
        blocks.append({"index": b["index"], "seconds": b["seconds"], "observe_s": st.get("observe_s", 0.0),
                       "scale_s": st.get("scale_s", 0.0), "clip_s": st.get("clip_s", 0.0),
                       "alphas": [m["alpha"] for m in st.get("mappings", [])]})
    out.update(blocks=blocks, capture_s=info["timings"].get("capture_s", 0.0), rss_before_mb=mem.start / 2**20,
               peak_rss_mb=mem.peak_mb, peak_increase_mb=mem.extra_mb)
    out.update(score(model, base, tok, args.eval_windows))
    return out


def qdq_levels(model: Any, bits: int, group_size: int) -> dict[str, Any]:
    """How many distinct values per weight group the llm-compressor model's forward really uses.

    compressed-tensors keeps the float (AWQ-scaled) weight and fake-quantizes it in each forward of
    a module with ``quantization_enabled``; this recomputes that QDQ weight for every quantized
    Linear, counts its distinct values per group (at most ``2**bits`` if quantized) and checks on
    one layer that the module's forward equals ``F.linear`` with the QDQ weight, not the stored one.
    """
    import torch
    import torch.nn.functional as F
    from compressed_tensors.quantization import forward_quantize

    def max_distinct(w: torch.Tensor) -> int:
        g = w.shape[1] if group_size == -1 else group_size
        srt = w.detach().float().reshape(-1, g).sort(dim=1).values
        return int(1 + (srt.diff(dim=1) != 0).sum(dim=1).max())

    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None]
    out: dict[str, Any] = {"layers": len(layers), "enabled": all(getattr(m, "quantization_enabled", False)
                                                                  for _, m in layers),
                           "status": sorted({str(getattr(getattr(m, "quantization_status", None), "value", None))
                                             for _, m in layers})}
    stored = qdq = 0
    with torch.no_grad():
        for _, m in layers:
            stored = max(stored, max_distinct(m.weight))
            qdq = max(qdq, max_distinct(forward_quantize(m, m.weight, "weight", m.quantization_scheme.weights)))
        name, m = layers[0]
        x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0))
        wq = forward_quantize(m, m.weight, "weight", m.quantization_scheme.weights)
        y = m(x)
        out.update(stored_max_levels=stored, qdq_max_levels=qdq, limit=2**bits, probe_layer=name,
                   forward_vs_qdq=float((y - F.linear(x, wq, m.bias)).abs().max()),
                   forward_vs_float=float((y - F.linear(x, m.weight, m.bias)).abs().max()))
    return out


def child_llmcompressor(args: argparse.Namespace) -> dict[str, Any]:
    """llm-compressor's AWQ + RTN on the same grid and calibration ids, evaluated like the ptqkit variants."""
    import copy

    import torch
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier  # 0.14: AWQ is a transform before quantization
    from llmcompressor.pipelines.cache import IntermediatesCache

    import ptqkit
    from ptqkit.calibration.data import load_calibration

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quantize_time import llmc_weights, run_oneshot

    # Patch for a machine without an accelerator: before each mapping's grid search AWQModifier._apply_smoothing
    # calls IntermediatesCache.pin_memory on its cached block inputs, and torch's Tensor.pin_memory() needs an
    # accelerator, so on a CPU-only machine oneshot dies at the first mapping. Pinned memory only speeds up
    # non-blocking host-to-device copies; with everything on the CPU there are none, so pinning becomes a no-op.
    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    model = copy.deepcopy(base)
    awq = AWQModifier()
    quant = QuantizationModifier(targets=["Linear"], ignore=["lm_head"], config_groups={
        "group_0": {"targets": ["Linear"], "weights": llmc_weights(args.bits, args.group_size, args.sym)}})
    out: dict[str, Any] = {"variant": "llmcompressor", "method": "llmcompressor AWQModifier + RTN",
                           "duo_scaling": awq.duo_scaling, "n_grid": awq.n_grid, "bits": args.bits,
                           "group_size": args.group_size, "sym": args.sym, "samples": args.samples,
                           "seqlen": args.seqlen, "calibration_fingerprint": calib.fingerprint,
                           "patched_pin_memory": not torch.accelerator.is_available()}
    out.update(run_oneshot(model, calib.ids, [awq, quant], args.llmc_batch_size))
    out["quantized"] = qdq_levels(model, args.bits, args.group_size)
    out.update(score(model, base, tok, args.eval_windows))
    return out


def score(model: Any, base: Any, tok: Any, windows: int) -> dict[str, Any]:
    """ppl, Δ%, KL and top-1 against ``base`` on ``windows`` x 2048 tokens of the builtin eval split."""
    if not windows:
        return {}
    from ptqkit.calibration.data import load_eval_ids
    from ptqkit.evaluation.perplexity import evaluate_windows

    r = evaluate_windows(model, load_eval_ids("builtin", tok), seqlen=2048, baseline=base, max_windows=windows,
                         progress=False)
    return {"ppl_fp": r["ppl_fp"], "ppl_q": r["ppl"], "delta_pct": 100 * (r["ppl"] - r["ppl_fp"]) / r["ppl_fp"],
            "kl": r["kl"], "top1": r["top1"], "eval_windows": r["protocol"]["windows"]}


def run_child(variant: str, argv: list[str], python: str = sys.executable) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), *argv, "--child", variant]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} run failed (exit code {proc.returncode}); see its output above")
    return json.loads(lines[-1][len(MARK):])


def print_blocks(r: dict[str, Any]) -> None:
    print(f"\n{r['variant']}: per block (seconds)")
    print(f"{'block':>5} {'total':>7} {'observe':>8} {'scale':>7} {'clip':>6} {'rest':>6}  alphas")
    keys = ("seconds", "observe_s", "scale_s", "clip_s")
    for b in r["blocks"]:
        rest = b["seconds"] - b["observe_s"] - b["scale_s"] - b["clip_s"]
        print(f"{b['index']:>5} {b['seconds']:7.2f} {b['observe_s']:8.2f} {b['scale_s']:7.2f} {b['clip_s']:6.2f} "
              f"{rest:6.2f}  {b['alphas']}")
    tot = {k: sum(b[k] for b in r["blocks"]) for k in keys}
    print(f"{'sum':>5} {tot['seconds']:7.2f} {tot['observe_s']:8.2f} {tot['scale_s']:7.2f} {tot['clip_s']:6.2f} "
          f"{tot['seconds'] - tot['observe_s'] - tot['scale_s'] - tot['clip_s']:6.2f}")
    print(f"capture of block-0 inputs {r['capture_s']:.2f}s; whole quantize call {r['total_s']:.2f}s")


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| variant | ppl | Δ% | KL | top-1 | quantize s | peak RSS MiB (+ over model) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        q = ("–",) * 4 if "ppl_q" not in r else (f"{r['ppl_q']:.3f}", f"{r['delta_pct']:+.2f}", f"{r['kl']:.4f}",
                                                 f"{r['top1']:.4f}")
        rows.append(f"| {r['variant']} | {' | '.join(q)} | {r['total_s']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} (+{r['peak_increase_mb']:.0f}) |")
    if results and "ppl_fp" in results[0]:
        rows.append(f"\nfp16/fp32 baseline ppl {results[0]['ppl_fp']:.3f} on {results[0]['eval_windows']} x 2048 tokens")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--variants", default="both", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--option", type=parse_option, action="append", default=[], help="AWQ option key=value")
    p.add_argument("--eval-windows", type=int, default=0, help="evaluate on this many 2048-token windows (17 = all)")
    p.add_argument("--compare-llmcompressor", action="store_true",
                   help="also run llm-compressor's AWQ on the same calibration ids and grid")
    p.add_argument("--llmc-python", default=sys.executable,
                   help="interpreter that can import llmcompressor (and ptqkit) (default: this one)")
    p.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor calibration batch size")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--child", choices=[*VARIANTS, "llmcompressor"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = child_llmcompressor if args.child == "llmcompressor" else child
        print(MARK + json.dumps(fn(args)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    argv = [a for a in sys.argv[1:] if a != "--compare-llmcompressor"]
    results = []
    for v in variants:
        r = run_child(v, argv)
        if v != "rtn":
            print_blocks(r)
        results.append(r)
    if args.compare_llmcompressor:
        r = run_child("llmcompressor", argv, python=args.llmc_python)
        q = r["quantized"]
        print(f"\nllmcompressor: AWQ duo_scaling={r['duo_scaling']} n_grid={r['n_grid']}, oneshot {r['total_s']:.2f}s; "
              f"{q['layers']} quantized Linears (status {', '.join(q['status'])}, fake-quant enabled {q['enabled']}): "
              f"stored weights up to {q['stored_max_levels']} distinct values per group, the forward's QDQ weights "
              f"up to {q['qdq_max_levels']} (limit {q['limit']}); {q['probe_layer']} forward vs QDQ weight "
              f"{q['forward_vs_qdq']:.2e}, vs stored weight {q['forward_vs_float']:.2e}")
        if not q["enabled"] or q["qdq_max_levels"] > q["limit"] or q["forward_vs_qdq"] > 1e-4:
            print("WARNING: the evaluated llmcompressor model does not look quantized on the requested grid")
        if any(x.get("calibration_fingerprint") != r["calibration_fingerprint"] for x in results):
            raise SystemExit("llmcompressor child saw other calibration ids than the ptqkit variants")
        results.append(r)
    print(f"\nW{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'}, {args.samples} x {args.seqlen} "
          f"calibration tokens (builtin, seed {args.seed})\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
