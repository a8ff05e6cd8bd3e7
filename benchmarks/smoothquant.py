"""SmoothQuant W8A8 on SmolLM2: perplexity, KL, outlier ratios and wall time per recipe.

    python benchmarks/smoothquant.py                      # the closing-note table (slow: 128 x 512 calibration)
    python benchmarks/smoothquant.py --num-samples 16 --seqlen 256 --windows 2 --configs w8a8,sq0.5

Configs: ``fp``, ``w8a8`` (RTN W8A8, no smoothing), ``sq<alpha>[/<linear_alpha>]`` (SmoothQuant
then W8A8 RTN; linear_alpha defaults to 0.5, ``none`` smooths the norm mappings only),
``sqauto`` (both strengths searched per block), ``+gptq`` (W8A8 GPTQ instead of RTN), ``:static``
(per-tensor static activations), e.g. ``sq0.8/0.9+gptq:static``. Every quantized model is scored on the same evaluation windows of
the builtin evaluation split as the fp model (protocol of ``ptqkit.evaluation``: non-overlapping
windows, ppl = exp(mean NLL), KL(fp || q) and top-1 agreement per scored token); the fp logits are
computed once per window for all configs. Outlier ratio = max / median of the per-channel max|x|
of a smoothed linear's input, averaged over the smoothed mappings (norm -> linears, and up -> down
with linear_alpha).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ptqkit
from ptqkit.calibration.data import load_calibration, load_eval_ids

log = logging.getLogger("benchmarks.smoothquant")


def recipe(config: str) -> tuple[Any, dict[str, Any]]:
    """``"sq0.8/0.5+gptq:static"`` -> (method, options) for ``ptqkit.quantize``."""
    name, _, acts = config.partition(":")
    opts: dict[str, Any] = {"activations": acts or "dynamic"}
    head, _, quantizer = name.partition("+")
    if head == "w8a8":
        return "rtn", {**opts, "bits": 8, "group_size": -1, "sym": True}
    if not head.startswith("sq"):
        raise ValueError(f"unknown config {config!r}: use fp, w8a8, sq<alpha>[/<linear_alpha>], sqauto, "
                         "optionally +gptq and :static")
    alpha, _, linear = head[2:].partition("/")
    linear = linear or ("auto" if alpha == "auto" else "0.5")
    opts["alpha"] = "auto" if alpha == "auto" else float(alpha)
    opts["linear_alpha"] = {"auto": "auto", "none": None}.get(linear) if linear in ("auto", "none") else float(linear)
    return (["smoothquant", quantizer] if quantizer else "smoothquant"), opts


@torch.no_grad()
def score(models: dict[str, nn.Module], baseline: nn.Module, ids: torch.Tensor, seqlen: int,
          windows: int) -> dict[str, dict[str, float]]:
    """ppl, KL(fp || q), top-1 agreement of each model on ``windows`` windows of ``seqlen`` tokens."""
    windows = min(windows, ids.numel() // seqlen)
    x = ids[: windows * seqlen].view(windows, seqlen)                   # [T'] -> [W, L]
    acc = {k: {"nll": 0.0, "kl": 0.0, "agree": 0} for k in models}
    nll_fp = 0.0
    for w in range(windows):
        t0 = time.perf_counter()
        target = x[w, 1:, None]                                         # [L-1, 1]
        lfp = F.log_softmax(baseline(x[w:w + 1], use_cache=False).logits[0, :-1].float(), -1)  # [L-1, V]
        nll_fp -= lfp.gather(1, target).sum().item()
        for k, m in models.items():
            lq = F.log_softmax(m(x[w:w + 1], use_cache=False).logits[0, :-1].float(), -1)
            acc[k]["nll"] -= lq.gather(1, target).sum().item()
            acc[k]["kl"] += F.kl_div(lq, lfp, log_target=True, reduction="sum").item()
            acc[k]["agree"] += (lq.argmax(-1) == lfp.argmax(-1)).sum().item()
        log.info("window %d/%d scored in %.1fs", w + 1, windows, time.perf_counter() - t0)
    n = windows * (seqlen - 1)
    out = {"fp": {"ppl": math.exp(nll_fp / n), "kl": 0.0, "top1": 1.0}}
    for k, a in acc.items():
        out[k] = {"ppl": math.exp(a["nll"] / n), "kl": a["kl"] / n, "top1": a["agree"] / n}
    for r in out.values():
        r["delta_pct"] = 100.0 * (r["ppl"] / out["fp"]["ppl"] - 1.0)
    out["_protocol"] = {"dataset": "builtin (evaluation split)", "seqlen": seqlen, "windows": windows, "scored": n}
    return out


def outlier_ratio(layers: dict[str, dict[str, Any]], when: str) -> float | None:
    """Mean over norm -> linears mappings of max/median per-channel max|x| (``when``: before/after)."""
    seen, vals = set(), []
    for v in layers.values():
        key = f"outlier_ratio_{when}"
        if v.get("smoothed_by") and key in v and v["smoothed_by"] not in seen:
            seen.add(v["smoothed_by"])
            vals.append(v[key])
    return sum(vals) / len(vals) if vals else None


def per_layer_table(layers: dict[str, dict[str, Any]]) -> str:
    """Markdown: per linear input, max / median of the per-channel max|x| before and after smoothing."""
    rows = ["| layer input | max before | median before | ratio before | max after | median after | ratio after |",
            "|---|---|---|---|---|---|---|"]
    for name, v in layers.items():
        if "outlier_ratio_before" not in v or name.endswith(("k_proj", "v_proj", "up_proj")):
            continue  # q/k/v and gate/up share one input
        after = [f"{v[k]:.3g}" for k in ("act_max_after", "act_median_after", "outlier_ratio_after")] \
            if "outlier_ratio_after" in v else ["(not smoothed)", "", ""]
        rows.append(f"| {name} | {v['act_max_before']:.3g} | {v['act_median_before']:.3g} | "
                    f"{v['outlier_ratio_before']:.3g} | " + " | ".join(after) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="w8a8,sq0.5,sq0.8,sqauto,sq0.8+gptq")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all numbers (and per-layer stats) here")
    p.add_argument("--layers-md", default=None, help="write the per-layer outlier table of the first sq config here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    base, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.num_samples, seqlen=args.seqlen, seed=args.seed)
    models, info = {}, {}
    for cfg in [c for c in args.configs.split(",") if c and c != "fp"]:
        method, opts = recipe(cfg)
        log.info("quantizing %s: method=%s %s", cfg, method, opts)
        m = ptqkit.quantize(copy.deepcopy(base), method=method, tokenizer=tok, calibration=calib, **opts)
        models[cfg], info[cfg] = m, m.ptqkit_info
    results = score(models, base, load_eval_ids("builtin", tok), args.eval_seqlen, args.windows)

    sq_before = next((outlier_ratio(i["layers"], "before") for i in info.values()
                      if outlier_ratio(i["layers"], "before")), None)
    print(f"\ncalibration: builtin, {args.num_samples} x {args.seqlen} tokens, seed {args.seed} "
          f"(fingerprint {calib.fingerprint[:12]}); eval: {results['_protocol']}; threads: {torch.get_num_threads()}\n")
    print("| config | ppl | Δ% | KL | top-1 | outlier ratio | quantize wall s |")
    print("|---|---|---|---|---|---|---|")
    r = results["fp"]
    print(f"| fp | {r['ppl']:.4f} | — | — | — | {sq_before or float('nan'):.1f} | — |")
    for cfg, i in info.items():
        r = results[cfg]
        ratio = outlier_ratio(i["layers"], "after") or sq_before or float("nan")
        blocks = [v for k, v in i["layers"].items() if k.count(".") == 2 and "alpha" in v]
        note = "".join(f" ({key} per block: {min(b[key] for b in blocks)}–{max(b[key] for b in blocks)})"
                       for key in ("alpha", "linear_alpha") if blocks and blocks[0].get(key) is not None)
        print(f"| {cfg}{note} | {r['ppl']:.4f} | {r['delta_pct']:+.2f} | {r['kl']:.4f} | {r['top1']:.4f} | "
              f"{ratio:.1f} | {i['timings']['quantize_s']:.0f} |")
    if args.layers_md:
        first = next((i for i in info.values() if outlier_ratio(i["layers"], "after")), None)
        if first is not None:
            with open(args.layers_md, "w") as f:
                f.write(per_layer_table(first["layers"]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "info": info}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
