"""``ptqkit estimate`` against measured CPU peaks: the runs its CPU coefficients were fitted on, and
runs the fit never saw (docs/scaling.md tables).

    python benchmarks/estimate_check.py               # all 18 runs (~15 min on 2 cores)
    python benchmarks/estimate_check.py --held-out    # only the 5 the fit never saw

Each run quantizes in a fresh interpreter with one thread and one malloc arena, as the ``ptqkit`` command
runs (freed memory returned to the kernel at a barrier where glibc keeps more than ``host.FREE_OVER`` of
the run), and reports
the RSS high-water mark over the paged-in model against ``host_peak - host_model``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import ptqkit.estimate as E

MEASURE = """
import json, torch, ptqkit
from ptqkit import estimate as E
from ptqkit.calibration import host
host.tune_process()  # as the ptqkit command does for itself: one malloc arena
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
torch.manual_seed(0)
model = {make}
for p in model.parameters():  # page in weights a safetensors load left memory-mapped: they count as the model
    p.detach().sum()
ids = torch.randint(0, model.config.vocab_size, ({n}, {length}), generator=torch.Generator().manual_seed(0))
with E.PeakMemory() as mem:
    ptqkit.quantize(model, {method!r}, calibration=ids, batch_size={batch}, pipeline={pipeline!r}, **{kw!r})
print("@@" + json.dumps(mem.peak - mem.start))
"""


def tiny_config(**kw):  # noqa: ANN003, ANN201
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(vocab_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512), **kw})


def measure(make: str, method: str, n: int, length: int, batch: int, pipeline: str, **kw) -> int:  # noqa: ANN003
    code = MEASURE.format(make=make, n=n, length=length, method=method, batch=batch, pipeline=pipeline, kw=kw)
    env = {k: v for k, v in os.environ.items() if k != "PTQKIT_MALLOC_TUNE"}  # the runner's default policy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.split("@@")[-1])


SMOL = None  # SmolLM2-135M


def _tiny(h: int, i: int) -> dict:
    return dict(hidden_size=h, intermediate_size=i)


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
        cfg = tiny_config(**kw)
        shape, make = E.ModelShape.from_config(cfg), f"LlamaForCausalLM(LlamaConfig(**{cfg.to_dict()!r})).eval()"
    extra = {} if kw is None or method == "smoothquant" else {"bits": 4, "group_size": 32}
    est = E.estimate(shape, method, n, length, batch, pipeline)
    measured = measure(make, method, n, length, batch, pipeline, **extra)
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
