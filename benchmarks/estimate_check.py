"""``ptqkit estimate`` against measured CPU peaks: the runs its CPU coefficients were fitted on, and
runs the fit never saw (docs/scaling.md tables).

    python benchmarks/estimate_check.py               # all 18 runs (~15 min on 2 cores)
    python benchmarks/estimate_check.py --held-out    # only the 5 the fit never saw

Each run quantizes in a fresh interpreter with one thread and the lean allocator
(``PTQKIT_MALLOC_TUNE=lean``, what the runner takes when memory is tight;
``tests/test_estimate.py::_measure``) and reports the RSS high-water mark over the paged-in model
against ``host_peak - host_model``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import ptqkit.estimate as E  # noqa: E402
from conftest import tiny_llama_config  # noqa: E402
from test_estimate import _measure  # noqa: E402

SMOL = None  # SmolLM2-135M


def _tiny(h: int, i: int) -> dict:
    return dict(max_position_embeddings=512, hidden_size=h, intermediate_size=i)


#: (model kwargs or SMOL, method, samples, seqlen, batch, pipeline)
FIT = [(_tiny(96, 256), "gptq", 48, 512, 8, "sequential"), (_tiny(96, 256), "awq", 48, 512, 8, "sequential"),
       (_tiny(64, 160), "gptq", 48, 512, 8, "sequential"), (_tiny(128, 480), "gptq", 32, 512, 8, "sequential"),
       (_tiny(96, 256), "gptq", 16, 512, 8, "sequential"), (_tiny(96, 256), "gptq", 96, 256, 8, "sequential")]
FIT += [(_tiny(96, 256), "gptq", 48, 512, b, "sequential") for b in (4, 2, 1)]
FIT += [(SMOL, "gptq", 16, 256, b, "sequential") for b in (8, 4, 2)] + [(SMOL, "gptq", 32, 512, 8, "sequential")]
HELD_OUT = [(_tiny(80, 224), "gptq", 40, 512, 8, "sequential"), (_tiny(96, 256), "gptq", 48, 512, 8, "two-pass"),
            (_tiny(112, 384), "smoothquant", 32, 512, 4, "sequential"), (SMOL, "awq", 16, 256, 8, "sequential"),
            (SMOL, "gptq", 24, 384, 4, "sequential")]


def check(kw: dict | None, method: str, n: int, length: int, batch: int, pipeline: str) -> str:
    if kw is None:
        name, shape, make = "SmolLM2", E.ModelShape.from_config(E.load_config("smollm2-135m")), \
            "ptqkit.load_model('smollm2-135m')[0]"
    else:
        name = f"tiny h{kw['hidden_size']} i{kw['intermediate_size']}"
        shape, make = E.ModelShape.from_config(tiny_llama_config(**kw)), f"__import__('test_estimate')._tiny(**{kw!r})"
    extra = {} if kw is None or method == "smoothquant" else {"bits": 4, "group_size": 32}
    est = E.estimate(shape, method, n, length, batch, pipeline)
    measured = _measure(make, method, n, length, batch, pipeline, **extra)
    predicted = est.host_peak - est.host_model
    return (f"| {name} | {method} | {pipeline} | {n} x {length} | {batch} | {measured / 2**20:.1f} | "
            f"{predicted / 2**20:.1f} | {predicted / measured - 1:+.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--held-out", action="store_true", help="only the runs the fit never saw")
    args = p.parse_args()
    print("| model | method | pipeline | samples x seqlen | batch | measured MiB | estimate MiB | error |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for case in HELD_OUT if args.held_out else FIT + HELD_OUT:
        print(check(*case), flush=True)


if __name__ == "__main__":
    main()
