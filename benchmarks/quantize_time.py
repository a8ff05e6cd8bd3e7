"""Wall time and peak memory of GPTQ on SmolLM2-135M, per block and in total.

    python benchmarks/quantize_time.py                          # ptqkit GPTQ W4 g64, 128 x 512 builtin tokens
    python benchmarks/quantize_time.py --bits 3 --option act_order=true --eval-windows 4
    /path/to/venv/bin/python benchmarks/quantize_time.py --compare-llmcompressor
    python benchmarks/quantize_time.py --as-command --compare-llmcompressor --llmc-python VENV/bin/python  # #21's pair
    python benchmarks/quantize_time.py --smoothquant 0.8 --compare-llmcompressor --llmc-python ... --eval-windows 8

Each run happens in a fresh child process (so peak memory is its own): the model is loaded, then
``ptqkit.quantize`` (or llm-compressor's ``oneshot`` with a ``GPTQModifier`` of the same scheme) runs
on the same calibration ids; ``--smoothquant ALPHA`` times SmoothQuant then GPTQ W8A8 in both tools
(llm-compressor: ``SmoothQuantModifier`` + ``GPTQModifier(scheme="W8A8")``). Model loading is
excluded from the quantization time. For ptqkit the time is split into the forward passes (block
time minus the rest), the Hessian accumulation and the GPTQ math (``quantize``).
``--compare-llmcompressor`` needs ``llmcompressor`` importable by ``--llmc-python`` (default: this
interpreter); ptqkit itself never needs it.
"""
from __future__ import annotations

import argparse
import json
import resource
import os
import subprocess
import sys
import time
from typing import Any

from ptqkit.estimate import PeakMemory  # noqa: E402  (Linux: exact high-water mark of the process)

MARK = "@@RESULT@@ "


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option {text!r}: use key=value, e.g. act_order=true")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import torch

    import ptqkit
    from ptqkit.calibration.data import load_calibration

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    return model, tok, calib


def perplexity(model: Any, tok: Any, windows: int) -> float | None:
    if windows <= 0:
        return None
    from ptqkit.evaluation import evaluate

    return evaluate(model, tok, max_windows=windows).ppl_q


def recipe(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """ptqkit's method and options: GPTQ on the weight grid, or SmoothQuant then GPTQ W8A8."""
    if args.smoothquant is not None:
        return ["smoothquant", "gptq"], {"alpha": args.smoothquant, "bits": 8, "group_size": -1, "sym": True,
                                         "activations": "dynamic"}
    return "gptq", {"bits": args.bits, "group_size": args.group_size, "sym": True}


def child_ptqkit(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import ptqkit

    model, tok, calib = load(args)
    out: dict[str, Any] = {"tool": "ptqkit", "options": dict(args.option)}
    if args.eval_windows:
        out["ppl_fp"] = perplexity(copy.deepcopy(model), tok, args.eval_windows)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        method, opts = recipe(args)
        ptqkit.quantize(model, method, calibration=calib, batch_size=args.batch_size, **opts, **dict(args.option))
        out["total_s"] = time.perf_counter() - t0
    info = model.ptqkit_info
    layers = info["layers"]
    blocks = []
    for b in info["blocks"]:
        pre = f"model.layers.{b['index']}."
        mine = [v for k, v in layers.items() if k.startswith(pre)]
        gptq = sum(v.get("quantize_s", 0.0) for v in mine)
        hess = sum(v.get("hessian_s", 0.0) for v in mine)
        blocks.append({"index": b["index"], "seconds": b["seconds"], "gptq_s": gptq, "hessian_s": hess,
                       "forward_s": b["seconds"] - gptq - hess})
    out.update(blocks=blocks, capture_s=info["timings"].get("capture_s", 0.0), rss_before_mb=mem.start / 2**20,
               peak_rss_mb=mem.peak_mb, peak_increase_mb=mem.extra_mb,
               damps=sorted({v["damp"] for v in layers.values() if "damp" in v}), allocator=info["host"].get("allocator"))
    out["ppl_q"] = perplexity(model, tok, args.eval_windows)
    return out


def llmc_weights(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """llm-compressor's weight quantization arguments for ptqkit's grid (group -1: per channel)."""
    w: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": sym,
                         "strategy": "channel" if group_size == -1 else "group"}
    if group_size != -1:
        w["group_size"] = group_size
    return w


def run_oneshot(model: Any, ids: Any, recipe: Any, batch_size: int) -> dict[str, float]:
    """llm-compressor's ``oneshot`` on ptqkit's calibration ids ``[N, L]`` (sequential pipeline, no
    shuffling): wall time and peak RSS."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], batch_size=batch_size, shuffle_calibration_samples=False,
                pipeline="sequential")
        total = time.perf_counter() - t0
    return {"total_s": total, "rss_before_mb": mem.start / 2**20, "peak_rss_mb": mem.peak_mb,
            "peak_increase_mb": mem.extra_mb}


def child_llmcompressor(args: argparse.Namespace) -> dict[str, Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    model, tok, calib = load(args)
    weights = llmc_weights(args.bits, args.group_size, sym=True)
    recipe: Any = GPTQModifier(targets="Linear", ignore=["lm_head"], actorder=args.llmc_actorder,
                               config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    if args.smoothquant is not None:  # its default Llama mappings: input norm -> q/k/v, post-attention norm -> gate/up
        recipe = [SmoothQuantModifier(smoothing_strength=args.smoothquant),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], actorder=args.llmc_actorder)]
    out: dict[str, Any] = {"tool": "llmcompressor", "actorder": args.llmc_actorder, "smoothquant": args.smoothquant}
    out.update(run_oneshot(model, calib.ids, recipe, args.llmc_batch_size))
    out["ppl_q"] = perplexity(model, tok, args.eval_windows)
    return out


def run_child(python: str, tool: str, argv: list[str]) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), *argv, "--child", tool]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{tool} run failed (exit code {proc.returncode}); see its output above")
    return json.loads(lines[-1][len(MARK):])


def print_ptqkit(r: dict[str, Any]) -> None:
    print("\nptqkit GPTQ per block (seconds)")
    print(f"{'block':>5} {'total':>8} {'forward':>8} {'hessian':>8} {'gptq':>8}")
    for b in r["blocks"]:
        print(f"{b['index']:>5} {b['seconds']:8.2f} {b['forward_s']:8.2f} {b['hessian_s']:8.2f} {b['gptq_s']:8.2f}")
    tot = {k: sum(b[k] for b in r["blocks"]) for k in ("seconds", "forward_s", "hessian_s", "gptq_s")}
    print(f"{'sum':>5} {tot['seconds']:8.2f} {tot['forward_s']:8.2f} {tot['hessian_s']:8.2f} {tot['gptq_s']:8.2f}")
    print(f"capture of block-0 inputs: {r['capture_s']:.2f}s; whole quantize call: {r['total_s']:.2f}s; "
          f"allocator: {r.get('allocator')}")
    share = {k: 100 * tot[k] / max(tot["seconds"], 1e-9) for k in ("forward_s", "hessian_s", "gptq_s")}
    print(f"split: forward {share['forward_s']:.0f}%, Hessian accumulation {share['hessian_s']:.0f}%, "
          f"GPTQ math {share['gptq_s']:.0f}%; damp used: {r['damps']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="ptqkit calibration batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--option", type=parse_option, action="append", default=[],
                   help="extra GPTQ option key=value (repeatable), e.g. act_order=true")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant with this strength, then GPTQ W8A8 (int8 per-token activations) instead of "
                        "weight-only GPTQ; --bits/--group-size are then ignored")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="also report perplexity on this many 2048-token windows of the builtin eval split")
    p.add_argument("--compare-llmcompressor", action="store_true", help="also time llm-compressor's GPTQ")
    p.add_argument("--llmc-python", default=sys.executable, help="interpreter that can import llmcompressor")
    p.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor calibration batch size")
    p.add_argument("--llmc-actorder", default="static", help="llm-compressor actorder (static, group, weight, null)")
    p.add_argument("--skip-ptqkit", action="store_true")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--as-command", action="store_true",
                   help="set the ptqkit child's process up as the ptqkit command does (jemalloc where installed, else "
                        "one glibc arena; huge pages): the default run")
    p.add_argument("--child", choices=["ptqkit", "llmcompressor"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llmc_actorder in ("null", "none", "None"):
        args.llmc_actorder = None

    if args.child:
        if args.child == "ptqkit" and args.as_command:
            from ptqkit.calibration import host

            host.tune_command()
        fn = child_ptqkit if args.child == "ptqkit" else child_llmcompressor
        print(MARK + json.dumps(fn(args)), flush=True)
        return

    argv = [a for a in sys.argv[1:] if a not in ("--compare-llmcompressor", "--skip-ptqkit")]
    llmc_argv = [a for a in argv if a != "--as-command"]
    results = []
    if not args.skip_ptqkit:
        results.append(run_child(sys.executable, "ptqkit", argv))
        print_ptqkit(results[-1])
    if args.compare_llmcompressor:
        results.append(run_child(args.llmc_python, "llmcompressor", llmc_argv))
    what = f"SmoothQuant (alpha {args.smoothquant}) + GPTQ W8A8" if args.smoothquant is not None else \
        f"GPTQ W{args.bits} g{args.group_size}"
    print(f"\n{what}, {args.samples} x {args.seqlen} builtin calibration tokens, "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tool':<14} {'quantize s':>10} {'peak RSS MB':>12} {'+ over load MB':>15} {'ppl (eval)':>11}")
    for r in results:
        ppl = f"{r['ppl_q']:.3f}" if r.get("ppl_q") else "-"
        print(f"{r['tool']:<14} {r['total_s']:10.1f} {r['peak_rss_mb']:12.0f} {r['peak_increase_mb']:15.0f} {ppl:>11}")
    if len(results) == 2:
        print(f"speed-up of ptqkit over llm-compressor: {results[1]['total_s'] / results[0]['total_s']:.2f}x")
    if results and results[0].get("ppl_fp"):
        print(f"fp perplexity on the same windows: {results[0]['ppl_fp']:.3f}")
    print(f"children's max RSS (resource): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
