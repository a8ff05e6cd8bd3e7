"""Data-parallel scaling of calibration: N ranks x 1 thread against 1 rank x 1 thread (GPTQ, CPU, gloo).

    python benchmarks/scaling.py                                  # SmolLM2-135M, 32 x 512 builtin tokens, 2 ranks
    python benchmarks/scaling.py --num-samples 16 --seqlen 256 --ranks 2 --method gptq

Each configuration runs under ``torchrun --nproc-per-node R`` (R = 1 for the baseline) with
``OMP_NUM_THREADS=1``; every rank loads the model itself (loading is not timed) and quantizes its
shard of the same calibration ids. Times come from the runner: a block's time splits into the GPTQ
math and its all-reduce (``quantize_s``, replicated on every rank, so it does not scale), the
Hessian accumulation (``hessian_s``) and the rest, the forward passes, which is what data
parallelism divides. The slowest rank's numbers count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    import ptqkit
    from ptqkit.calibration.data import load_calibration

    torch.set_num_threads(1)
    model, tok = ptqkit.load_model(args.model)
    calib = load_calibration("builtin", tok, num_samples=args.num_samples, seqlen=args.seqlen, seed=0)
    t = time.perf_counter()
    ptqkit.quantize(model, args.method, calibration=calib, batch_size=args.batch_size)
    wall = time.perf_counter() - t
    info = model.ptqkit_info
    layers = info["layers"].values()
    blocks = sum(b["seconds"] for b in info["blocks"])
    math = sum(v.get("quantize_s", 0.0) for v in layers)
    hess = sum(v.get("hessian_s", 0.0) for v in layers)
    res = {"rank": int(os.environ.get("RANK", "0")), "wall_s": wall, "capture_s": info["timings"].get("capture_s", 0.0),
           "blocks_s": blocks, "quantize_math_s": math, "hessian_s": hess, "forward_s": blocks - math - hess,
           "samples": (info.get("distributed") or {}).get("samples_per_rank", [args.num_samples])}
    Path(args.out, f"rank{res['rank']}.json").write_text(json.dumps(res))


def launch(args: argparse.Namespace, ranks: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"ptqkit-scaling-{ranks}-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={ranks}", __file__, "--worker", "--out", out,
           "--model", args.model, "--method", args.method, "--num-samples", str(args.num_samples),
           "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    subprocess.run(cmd, env=env, check=True)
    runs = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {k: max(r[k] for r in runs) if k.endswith("_s") else runs[0][k] for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="gptq")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    one, many = launch(args, 1), launch(args, args.ranks)
    print(f"\n{args.model}, {args.method}, {args.num_samples} x {args.seqlen} tokens, batch {args.batch_size}, "
          f"1 thread per rank; samples per rank: 1 rank {one['samples']}, {args.ranks} ranks {many['samples']}")
    print(f"{'seconds':<28} {'1 rank':>9} {f'{args.ranks} ranks':>9} {'ratio':>7}")
    for k, label in (("forward_s", "forward passes"), ("hessian_s", "Hessian accumulation"),
                     ("quantize_math_s", "GPTQ math + all-reduce"), ("capture_s", "input capture"),
                     ("wall_s", "quantize() wall")):
        print(f"{label:<28} {one[k]:9.2f} {many[k]:9.2f} {many[k] / max(one[k], 1e-9):7.2f}")
    print(f"target: forward passes ratio <= 0.6; measured {many['forward_s'] / max(one['forward_s'], 1e-9):.2f}")


if __name__ == "__main__":
    sys.exit(main())
