"""Peak memory of a calibration run, from the model config alone (no weights loaded).

The model of ``ptqkit.calibration.runner`` (read its docstring), with ``T = num_samples·seqlen``
calibration tokens, ``B = batch_size·seqlen`` tokens per batch, ``H`` hidden, ``I`` intermediate
size, ``e`` bytes per element:

- **block weights**: one decoder block on the execution device, twice while it is quantized (the
  original linears plus the dequantized stand-ins the runner computes with), plus its packed codes;
- **activations**: the block inputs ``T·H·e`` stay for the whole block and its outputs ``T·H·e``
  accumulate next to them. The *sequential* pipeline holds every batch's intermediate activations
  at once (all batches pause at each linear until the linear is quantized): the most at a pause is
  ``max(3H + 2·kv_dim, 2H + I)`` values per token (o_proj: normed input, q, k, v, attention
  output; down_proj: residual, normed input, gated product). *Two-pass* holds one batch's;
  ``offload_activations`` moves inputs/outputs (not the intermediates) to the host;
- **statistics**: GPTQ's fp32 Hessians ``K×K`` (sequential: one at a time, plus the per-batch
  ``Σ x xᵀ`` cache of at most 256 MiB; two-pass: every linear's at once); AWQ's Gram matrices of
  each distinct linear input plus its sampled token rows; SmoothQuant's per-channel maxima (tiny);
- **workspace**: quantizing the largest linear (GPTQ: fp32 weight copy, error and result buffers,
  the inverse Cholesky factor; RTN: a fp32 weight copy).

On the host add the whole model's weights (the model stays there; disk-offloaded: at most the
``host_weights_budget``) and the quantized blocks as they accumulate (≈ 4 bits a weight). On a CPU
run the host *is* the device, every term lands in host memory, and the batch threads' own buffers
and a fixed overhead are added (``CPU_THREAD``, ``CPU_FIXED``; measured with glibc's allocator
lean, as the runner makes it when memory is tight). ``check`` compares the estimate with free memory and names the knobs that
would make a run fit.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

GIB = 2**30
GRAM_CACHE_BYTES = 256 * 2**20  # gptq.GRAM_CACHE_BYTES (the per-batch Σ x xᵀ cache)
#: CPU runs (glibc with one arena and the fixed 1 MiB mmap threshold that the runner sets when memory
#: is tight, ``ptqkit/calibration/host.py``; without it the peak is 1.0-2.2x this): every
#: calibration batch of the sequential pipeline runs in its own thread, and each thread costs about
#: ``CPU_THREAD[0] + CPU_THREAD[1]·(H + I)`` bytes beyond the activations it holds (the BLAS's
#: per-thread buffers grow with the matrices), plus ``CPU_FIXED`` once. Least-squares fit over 13
#: measured peaks (tiny Llamas of hidden 64-128, SmolLM2-135M; 1-48 batches; docs/scaling.md); the fit
#: put a coefficient of 1.00 on the live-set term, so that one stays exact.
CPU_THREAD = (512 * 2**10, 7500)
CPU_FIXED = 27 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only (Llama-like) model that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        cfg = getattr(cfg, "text_config", None) or cfg
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if getattr(cfg, k, None) is None]
        if missing:
            raise ValueError(f"the model config has no {missing}: the estimate needs a Llama-like decoder config")
        heads = cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.vocab_size,
                   bool(getattr(cfg, "tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_params(self) -> int:
        h, i, q = self.hidden, self.intermediate, self.heads * self.head_dim
        return h * q * 2 + h * self.kv_dim * 2 + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, 2 norms

    def linear_params(self) -> int:
        return self.block_params() - 2 * self.hidden

    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.block_params() + embed * (1 if self.tied else 2) + self.hidden


@dataclass
class MemoryEstimate:
    """Peak bytes of one calibration run, by part, on the execution device and on the host."""

    device: str
    block_weights: int
    activations: int
    statistics: int
    workspace: int
    host_model: int
    host_activations: int
    same_memory: bool  # the device is the host (CPU run): every part adds up in host memory
    host_quantized: int = 0  # the quantized blocks, accumulating on the host next to the original weights

    @property
    def device_peak(self) -> int:
        return self.block_weights + self.activations + self.statistics + self.workspace

    @property
    def host_peak(self) -> int:
        return (self.host_model + self.host_quantized + self.host_activations
                + (self.device_peak if self.same_memory else 0))

    def table(self) -> str:
        rows = [("block weights", self.block_weights), ("activations", self.activations),
                ("statistics", self.statistics), ("workspace", self.workspace),
                (f"peak on {self.device}", self.device_peak)]
        rows += [("host: model weights", self.host_model), ("host: quantized blocks", self.host_quantized)]
        if not self.same_memory:
            rows += [("host: block inputs/outputs", self.host_activations), ("peak on host", self.host_peak)]
        else:
            rows += [("peak on host (device is the host)", self.host_peak)]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{w}}  {b / GIB:10.3f} GiB" for name, b in rows)


def load_config(model: str) -> Any:
    """The model's ``transformers`` config, without loading weights."""
    from transformers import AutoConfig

    from .models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))


def _gptq_stats(s: ModelShape, batches: int, pipeline: str) -> int:
    h, i = s.hidden, s.intermediate
    if pipeline == "two-pass":  # every linear's Hessian exists until the block is quantized
        return 4 * (6 * h * h + i * i)
    grams = min(batches * 4 * (h * h + i * i), GRAM_CACHE_BYTES)
    return grams + 4 * i * i + 2 * 4 * h * h  # the Hessian being used, the last factorization kept


def _awq_stats(s: ModelShape, tokens: int, search_tokens: int = 2048) -> int:
    h, i = s.hidden, s.intermediate
    rows = min(search_tokens + 1, tokens)
    return 4 * (3 * h * h + i * i) + 4 * rows * (3 * h + i)


def estimate(
    shape: ModelShape,
    method: str | list[str] = "gptq",
    num_samples: int = 128,
    seqlen: int = 512,
    batch_size: int = 8,
    pipeline: str = "sequential",
    device: str = "cpu",
    offload_activations: bool = False,
    dtype: torch.dtype = torch.float32,
    host_weights_budget: int | None = None,
) -> MemoryEstimate:
    """Peak memory of ``ptqkit.quantize`` with these settings (see the module docstring).

    ``host_weights_budget``: the model is disk-offloaded (``--offload-folder``) with at most this many
    bytes of its weights in host memory (0: only what lies outside the decoder blocks); the quantized
    blocks (≈ 4 bits per weight) accumulate next to it."""
    for name, v in (("num_samples", num_samples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if pipeline not in ("sequential", "two-pass"):
        raise ValueError(f"pipeline={pipeline!r}: choose sequential or two-pass")
    steps = [m.strip().lower() for m in (method.replace("+", ",").split(",") if isinstance(method, str) else method)]
    e = torch.empty((), dtype=dtype).element_size()
    s, h, i = shape, shape.hidden, shape.intermediate
    tokens, per_batch = num_samples * seqlen, min(batch_size, num_samples) * seqlen
    batches = -(-num_samples // batch_size)
    data_free = steps == ["rtn"]
    same = torch.device(device).type == "cpu"

    block = s.block_params() * e + s.linear_params() * e + s.linear_params() // 2  # fp, dequantized, packed
    live = max(3 * h + 2 * s.kv_dim, 2 * h + i)           # values per token alive at the worst pause
    transient = per_batch * (h + i) * e                   # the batch that computes meanwhile
    threads = (batches if pipeline == "sequential" else 1) * (CPU_THREAD[0] + CPU_THREAD[1] * (h + i))
    if data_free:
        inout, inter = 0, 0
    elif same:  # the host: inputs, and the live set of every paused batch (sequential) or of one (two-pass)
        inout = 0
        held = tokens if pipeline == "sequential" else per_batch
        inter = tokens * h * e * (1 if pipeline == "sequential" else 2) + held * live * e + transient + threads + CPU_FIXED
    else:
        inout = 2 * tokens * h * e                        # block inputs + outputs
        inter = (tokens if pipeline == "sequential" else per_batch) * live * e + transient
    stats = 0
    if "gptq" in steps:
        stats += _gptq_stats(s, batches, pipeline)
    if "awq" in steps:
        stats += _awq_stats(s, tokens)
    big = h * i                                           # the largest linear's weight
    work = (3 * big * 4 + 2 * 4 * i * i) if "gptq" in steps else 2 * big * 4
    on_host = offload_activations and not same
    return MemoryEstimate(
        device=str(device), block_weights=block, activations=inter + (0 if on_host else inout), statistics=stats,
        workspace=work, host_model=_host_weights(s, e, host_weights_budget),
        host_activations=inout if on_host else 0, same_memory=same,
        host_quantized=s.layers * s.linear_params() // 2)


def _host_weights(s: ModelShape, e: int, budget: int | None) -> int:
    full = s.total_params() * e
    if budget is None:
        return full
    outside = (s.total_params() - s.layers * s.block_params()) * e
    return min(full, max(budget, outside))


def parse_size(size: int | str) -> int:
    """Bytes from ``20GiB``, ``500MB`` or an integer (accelerate's ``max_memory`` notation)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(size))
    except ValueError as e:
        raise ValueError(f"{size!r} is not a memory size: write e.g. 20GiB or 500MB") from e


def free_memory(device: str) -> tuple[int, int | None]:
    """``(free host bytes, free device bytes or None for a CPU run)``."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        avail = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = psutil.virtual_memory().available
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return avail, free
    return avail, None


def _fits(est: MemoryEstimate, host_free: int, dev_free: int | None) -> bool:
    return est.host_peak <= host_free and (dev_free is None or est.device_peak <= dev_free)


def suggest(shape: ModelShape, kw: dict[str, Any], host_free: int, dev_free: int | None) -> list[str]:
    """Settings (CLI flags) that would fit, cheapest change first."""
    tries = [({"offload_activations": True}, "--offload-activations"),
             ({"pipeline": "two-pass"}, "--pipeline two-pass"),
             ({"pipeline": "two-pass", "offload_activations": True}, "--pipeline two-pass --offload-activations")]
    for b in (4, 2, 1):
        if b < kw.get("batch_size", 8):
            tries.append(({"pipeline": "two-pass", "offload_activations": True, "batch_size": b},
                          f"--pipeline two-pass --offload-activations --batch-size {b}"))
    out = [flag for change, flag in tries if _fits(estimate(shape, **{**kw, **change}), host_free, dev_free)]
    n = kw.get("num_samples", 128)
    while n > 1:
        n //= 2
        if _fits(estimate(shape, **{**kw, "num_samples": n}), host_free, dev_free):
            out.append(f"--num-samples {n}")
            break
    if kw.get("host_weights_budget") is None:  # the slowest change: read the blocks from disk in turn
        room = host_free - estimate(shape, **{**kw, "host_weights_budget": 0}).host_peak
        if room > 0 and _fits(estimate(shape, **{**kw, "host_weights_budget": room}), host_free, dev_free):
            out.append(f"--offload-folder DIR --max-host-memory {room // 2**20}MiB")
    return out


def check(shape: ModelShape, extra_host: int = 0, **kw: Any) -> MemoryEstimate:
    """Raise ``MemoryError`` naming the knobs that fit when the estimate exceeds free memory."""
    est = estimate(shape, **kw)
    host_free, dev_free = free_memory(kw.get("device", "cpu"))
    est = dataclasses.replace(est, host_model=est.host_model + extra_host)
    if _fits(est, host_free, dev_free):
        return est
    where = (f"host {est.host_peak / GIB:.2f} GiB > {host_free / GIB:.2f} GiB available" if est.host_peak > host_free
             else f"{est.device} {est.device_peak / GIB:.2f} GiB > {dev_free / GIB:.2f} GiB free")
    fixes = suggest(shape, kw, host_free - extra_host, dev_free)
    raise MemoryError(f"the calibration run would not fit in memory ({where}):\n{est.table()}\n"
                      + (f"settings that fit: {'; or '.join(fixes)}" if fixes else
                         "no single setting fits: use a machine with more memory")
                      + " (skip this check with --no-memory-check)")


# ------------------------------------------------------------------------- measurement
def _hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Measure the peak RSS increase of the block (Linux): ``result["peak"]`` in bytes afterwards.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM``; where that
    is not allowed, samples ``/proc/self/statm`` every millisecond in a thread.
    """
    res: dict[str, int] = {}
    base = rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    stop, top = threading.Event(), [base]

    def sample() -> None:
        while not stop.is_set():
            top[0] = max(top[0], rss_bytes())
            time.sleep(0.001)

    t = None if exact else threading.Thread(target=sample, daemon=True)
    if t is not None:
        t.start()
    try:
        yield res
    finally:
        stop.set()
        if t is not None:
            t.join()
        peak = _hwm_kib() * 1024 if exact else top[0]
        res["peak"] = max(peak - base, 0)
        res["base"] = base
