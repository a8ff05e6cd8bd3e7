"""A digest of everything a quantization run produces on SmolLM2-135M, per method: run it before and
after a refactor and compare the lines (equal digests = the same codes, scales, zero points, folded
norms and float weights, bit for bit).

    python benchmarks/codes_digest.py                                   # rtn, gptq, awq, smoothquant+gptq; 32 x 512
    python benchmarks/codes_digest.py --samples 128 --methods gptq --json /tmp/after.json
    python benchmarks/codes_digest.py --compare /tmp/before.json /tmp/after.json
    python benchmarks/codes_digest.py --methods gptq --pipeline two-pass                  # the two-pass pipeline

Every method runs on the same calibration ids (builtin split, seed 0) with W4 g64 (W8A8 for the
SmoothQuant recipe); the digest is a sha256 over the state dict (names, dtypes, shapes, bytes) in
name order. Each method runs in a fresh copy of the model loaded once.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time

METHODS = ("rtn", "gptq", "awq", "smoothquant+gptq")


def digest(model) -> str:  # noqa: ANN001
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; join recipe steps with +")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--pipeline", default="auto", help="auto, sequential, two-pass (the same on both sides of a comparison)")
    p.add_argument("--json", default=None, help="also write {method: digest} here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --json files and exit")
    args = p.parse_args()
    if args.compare:
        a, b = (json.load(open(f)) for f in args.compare)
        bad = [m for m in a if m in b and a[m] != b[m]]
        for m in a:
            print(f"{m:<20} {'same' if a[m] == b.get(m) else 'DIFFERENT' if m in b else 'missing'}")
        return 1 if bad else 0

    import ptqkit
    from ptqkit.calibration.data import load_calibration

    base, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=args.samples, seqlen=args.seqlen, seed=0)
    out = {}
    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        steps = method.split("+")
        kw = {} if "smoothquant" in steps else {"bits": 4, "group_size": 64}
        t = time.perf_counter()
        ptqkit.quantize(model, steps if len(steps) > 1 else method, tokenizer=tok, calibration=calib,
                        pipeline=args.pipeline, **kw)
        out[method] = digest(model)
        print(f"{method:<20} {out[method]}  ({time.perf_counter() - t:.1f} s)", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
