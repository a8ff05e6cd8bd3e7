"""Peak host memory (and wall time) of a SmolLM2 calibration run against ``ptqkit estimate``, under
glibc settings.

    python benchmarks/malloc_peak.py                          # GPTQ W4 g64, 16 x 256 tokens, ptqkit's default
    PTQKIT_MALLOC_TUNE=lean python benchmarks/malloc_peak.py  # one arena + 1 MiB mmap threshold: the estimate's
    PTQKIT_MALLOC_TUNE=0 python benchmarks/malloc_peak.py     # glibc's defaults
    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1048576 PTQKIT_MALLOC_TUNE=0 python benchmarks/malloc_peak.py
    python benchmarks/malloc_peak.py --samples 32 --seqlen 512 --threads 2   # with timing that means something

``import ptqkit`` limits glibc to one arena; the runner fixes the mmap threshold when memory is tight
(``PTQKIT_MALLOC_TUNE=auto``, ``ptqkit/calibration/host.py``). Prints the RSS high-water mark above
the paged-in model (``/proc/self/status``: VmHWM, reset through ``/proc/self/clear_refs``), the
anonymous RSS growth after the run and after ``malloc_trim(0)`` (memory malloc held but no tensor
used), and the estimate's prediction. Linux and glibc only.
"""
from __future__ import annotations

import argparse
import ctypes
import re
import time

import torch

import ptqkit
import ptqkit.estimate as E
from ptqkit.calibration import host


def status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "RssAnon", "VmHWM")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="gptq")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = ptqkit.load_model("smollm2-135m")
    for prm in model.parameters():  # page the memory-mapped weights in before measuring
        prm.detach().sum()
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    with E.peak_rss() as r:
        before = status()
        t = time.perf_counter()
        ptqkit.quantize(model, args.method, calibration=ids, batch_size=args.batch_size, bits=4, group_size=64)
        wall = time.perf_counter() - t
    after = status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = status()
    est = E.estimate(E.ModelShape.from_config(E.load_config("smollm2-135m")), args.method, args.samples,
                     args.seqlen, args.batch_size)
    print(f"{args.method} {args.samples} x {args.seqlen}, {args.threads} thread(s), glibc settings by ptqkit: "
          f"{host.tuned() or 'none'}; quantize {wall:.1f} s")
    print(f"peak increase {r['peak'] / 2**20:.0f} MiB; anon after +{after['RssAnon'] - before['RssAnon']} MiB, "
          f"after malloc_trim +{trimmed['RssAnon'] - before['RssAnon']} MiB; "
          f"estimate {(est.host_peak - est.host_model) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
