"""SASS instructions per weight code in the inner K loop of the fused W4A16 kernel, compiled for sm_90
(H100/H200) on a machine without a GPU: the number the kernel's tile table was chosen by.

    python benchmarks/sass_count.py                               # M=1, N=K=8192, group 128: the shipped config
    python benchmarks/sass_count.py --m 16 --cfg 128x128:4:3      # another problem / an explicit tile
    python benchmarks/sass_count.py --dump /tmp/sass              # also write the .sass and .ptx

The launch is specialised as ``wxa16_linear`` would specialise it on a GPU of that capability (the
shipped table or the heuristic picks the config; 132 SMs for the split-K), compiled by Triton
(``triton.compile`` with a ``GPUTarget``), disassembled with the ``cuobjdump`` the triton wheel
ships. The loop is the innermost backward branch whose body holds the ``HGMMA``s; instructions per code
= the loop's instructions / (BLOCK_K x BLOCK_N codes per iteration / threads). Registers and local
memory (spills) are cuobjdump's ``-res-usage``. Needs no GPU and must not run under TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget

from ptqkit.kernels import autotune
from ptqkit.kernels import triton_gemv as tg
from ptqkit.kernels import triton_wxa16 as tw

TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(.*?)\s*;")   # address, instruction (no predicate)


def spec(m: int, n: int, k: int, group_len: int, bits: int, dtype: torch.dtype, cfg: dict | None,
         arch: int, sms: int) -> dict:
    """Kernel argument types, integer values and constexprs of the launch on a ``sm_<arch>`` GPU."""
    dev = torch.device("cuda", 0)
    with mock.patch.object(autotune, "capability", lambda index: (arch // 10, arch % 10)), \
            mock.patch.object(autotune, "sm_count", lambda index: sms):   # no GPU here: the target's as the launch sees it
        cfg = cfg or tw.default_config(m, n, k, group_len, bits, dev, dtype, dtype)
        plan = tw.plan_params(cfg, m, n, k, group_len, bits, dtype, dtype, dev, False, False)
    if cfg["path"] != "fused" or plan.consts is None:
        sys.exit(f"{cfg} is not a fused config for M={m} N={n} K={k} group {group_len}")
    c, ty, split = plan.consts, {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype], plan.splits > 1
    tma = c["FAST"] and arch >= 90 and n % 4 == 0
    ptrs = dict(x_ptr=f"*{ty}", perm_ptr=f"*{ty}", q_ptr="*i32", s_ptr=f"*{ty}", z_ptr="*u8", bias_ptr=f"*{ty}",
                out_ptr=f"*{ty}", ws_ptr="*fp32" if split else f"*{ty}", cnt_ptr="*i32" if split else f"*{ty}")
    consts = dict(c, ASM=True, USE_TMA=tma)
    if tma:
        ptrs["q_desc"] = f"tensordesc<i32[{c['BK'] // 8}, {c['BN']}]>"
    else:
        consts["q_desc"] = None
    ints = dict(M=m, N=n, K=k, KW=(k * bits + 31) // 32, G=tw.num_groups(k, group_len),
                chunks_per_split=plan.per_split, splits=plan.splits)
    return dict(ptrs=ptrs, ints=ints, consts=consts, cfg=dict(cfg, SPLIT_K=plan.splits),
                codes=c["BK"] * c["BN"] / (32 * cfg["num_warps"]))


def compile_for(s: dict, arch: int) -> triton.compiler.CompiledKernel:
    """``triton.compile`` the fused kernel as the JIT would specialise it (16-aligned pointers and integers)."""
    fn, sig, constexprs, attrs = tg.fused_kernel, {}, dict(s["consts"]), {}
    for i, name in enumerate(fn.arg_names):
        if name in s["ptrs"]:
            sig[name] = s["ptrs"][name]
            aligned = not s["ptrs"][name].startswith("tensordesc")
        elif name in s["ints"] and s["ints"][name] == 1:
            sig[name], constexprs[name], aligned = "constexpr", 1, False   # the JIT specialises 1
        elif name in s["ints"]:
            sig[name], aligned = "i32", s["ints"][name] % 16 == 0
        elif name in constexprs:
            sig[name], aligned = "constexpr", False
        else:
            raise KeyError(f"no value for the kernel argument {name!r}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    cfg = s["cfg"]
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The instructions (predicates dropped) of the innermost loop holding the wgmma (HGMMA) instructions: the
    shortest backward branch's body with them (an outer one also spans the split-K epilogue)."""
    ins = [(int(a, 16), t) for a, t in INSTR.findall(sass)]
    best: list[str] = []
    for addr, text in ins:
        hit = re.match(r"BRA\S*\s+.*?0x([0-9a-f]+)", text)
        if hit and int(hit.group(1), 16) < addr:
            body = [t for a, t in ins if int(hit.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body) and (not best or len(body) < len(best)):
                best = body
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(TYPES), default="fp16")
    p.add_argument("--cfg", help="BLOCK_NxBLOCK_K[:warps[:stages]], e.g. 256x128:4:3 (default: what a launch picks)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--sms", type=int, default=132, help="SM count for the split-K (132: H100 SXM)")
    p.add_argument("--dump", type=Path, help="write the .sass and .ptx here")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernel for the GPU")
    cfg = None
    if args.cfg:
        tile, *rest = args.cfg.split(":")
        bn, bk = (int(v) for v in tile.split("x"))
        warps, stages = (int(v) for v in (rest + ["4", "3"])[:2])
        cfg = {"path": "fused", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    s = spec(args.m, args.n, args.k, args.group_size, 4, TYPES[args.dtype], cfg, args.arch, args.sms)
    kernel = compile_for(s, args.arch)
    sass = cuobjdump(kernel.asm["cubin"], "-sass")
    usage = cuobjdump(kernel.asm["cubin"], "-res-usage")
    loop = main_loop(sass)
    if not loop:
        sys.exit("no loop with HGMMA instructions found in the SASS")
    ops = collections.Counter(t.split()[0].split(".")[0] for t in loop)
    regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    res = dict(config=s["cfg"], loop_instructions=len(loop), codes_per_thread=s["codes"],
               instructions_per_code=round(len(loop) / s["codes"], 4),
               branches_in_loop=sum(t.startswith("BRA") for t in loop[:-1]),
               registers=int(regs.group(1)) if regs else None, local_bytes=int(local.group(1)) if local else None)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"config {s['cfg']} for M={args.m} N={args.n} K={args.k} group {args.group_size} {args.dtype} sm_{args.arch}")
        print(f"loop: {len(loop)} instructions, {s['codes']:.0f} codes/thread/iteration -> "
              f"{len(loop) / s['codes']:.2f} instructions/code; {res['branches_in_loop']} branch(es) inside it "
              "(0: one basic block)")
        print(f"registers {res['registers']}, local memory {res['local_bytes']} bytes (spills)")
        print("most frequent: " + ", ".join(f"{op} {c}" for op, c in ops.most_common(12)))
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        (args.dump / "fused.sass").write_text(sass)
        (args.dump / "fused.ptx").write_text(kernel.asm["ptx"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
