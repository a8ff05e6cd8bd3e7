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
    from ptqkit.calibration.data import load_calibration, load_eval_ids
    from ptqkit.evaluation.perplexity import evaluate_windows

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quantize_time import PeakRSS

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    model = copy.deepcopy(base)
    extra = VARIANTS[args.child]
    method = "rtn" if extra is None else [{"method": "awq", **dict(args.option), **extra}, "rtn"]
    out: dict[str, Any] = {"variant": args.child, "method": method, "bits": args.bits, "group_size": args.group_size,
                           "sym": args.sym, "samples": args.samples, "seqlen": args.seqlen}
    with PeakRSS() as mem:
        before = mem.rss() / 2**20
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
    out.update(blocks=blocks, capture_s=info["timings"].get("capture_s", 0.0), rss_before_mb=before,
               peak_rss_mb=mem.peak_mb, peak_increase_mb=mem.peak_mb - before)
    if args.eval_windows:
        ids = load_eval_ids("builtin", tok)
        r = evaluate_windows(model, ids, seqlen=2048, baseline=base, max_windows=args.eval_windows, progress=False)
        out.update(ppl_fp=r["ppl_fp"], ppl_q=r["ppl"], delta_pct=100 * (r["ppl"] - r["ppl_fp"]) / r["ppl_fp"],
                   kl=r["kl"], top1=r["top1"], eval_windows=r["protocol"]["windows"])
    return out


def run_child(variant: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant]
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
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    argv = [a for a in sys.argv[1:]]
    results = []
    for v in variants:
        r = run_child(v, argv)
        if v != "rtn":
            print_blocks(r)
        results.append(r)
    print(f"\nW{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'}, {args.samples} x {args.seqlen} "
          f"calibration tokens (builtin, seed {args.seed})\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
