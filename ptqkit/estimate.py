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
- **statistics** and **workspace**: what each recipe step says it holds (``Algorithm.memory``: GPTQ's
  fp32 Hessians and their factorization, AWQ's Gram matrices and sampled rows, ...), summed over the
  steps; the workspace is the largest step's.

On the host add the whole model's weights (the model stays there; disk-offloaded: at most the
``host_weights_budget``) and the quantized blocks as they accumulate (≈ 4 bits a weight). On a CPU
run the host *is* the device, every term lands in host memory, and the batch threads' own buffers
and a fixed overhead are added (``CPU_THREAD``, ``CPU_FIXED``; measured with freed memory returned to
the kernel, as the runner does when memory is tight). :mod:`ptqkit.plan` compares the estimate with free
memory and names the knobs that would make a run fit.
"""
from __future__ import annotations

import gc
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_positive

GIB = 2**30
#: CPU runs (measured with one malloc arena and a fixed 1 MiB mmap threshold: the live set, as freed memory
#: returned to the kernel at every barrier gives when memory is tight, ``ptqkit/calibration/host.py``;
#: glibc left alone peaks at 1.0-2.2x this): every
#: calibration batch of the sequential pipeline runs in its own thread, and each thread costs about
#: ``CPU_THREAD[0] + CPU_THREAD[1]·(H + I)`` bytes beyond the activations it holds (the BLAS's
#: per-thread buffers grow with the matrices), plus ``CPU_FIXED`` once. Least-squares fit over 13
#: measured peaks (tiny Llamas of hidden 64-128, SmolLM2-135M; 1-48 batches; docs/scaling.md); the fit
#: put a coefficient of 1.00 on the live-set term, so that one stays exact.
CPU_THREAD = (512 * 2**10, 7500)
CPU_FIXED = 27 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model that memory depends on (Llama-like attention; a dense MLP, or routed
    experts with an optional shared expert)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0                 # routed experts per block (0: a dense MLP)
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        cfg = getattr(cfg, "text_config", None) or cfg
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if getattr(cfg, k, None) is None]
        if missing:
            raise ValueError(f"the model config has no {missing}: the estimate needs a Llama-like decoder config")
        heads = cfg.num_attention_heads
        get = lambda *keys: next((getattr(cfg, k) for k in keys if getattr(cfg, k, None)), 0)  # noqa: E731
        experts = get("num_experts", "num_local_experts", "n_routed_experts")
        moe_i = get("moe_intermediate_size") or cfg.intermediate_size
        shared = get("shared_expert_intermediate_size") or get("n_shared_experts") * moe_i
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.vocab_size,
                   bool(getattr(cfg, "tie_word_embeddings", False)), experts, moe_i if experts else 0,
                   shared if experts else 0)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def _mlps(self) -> list[int]:
        """The intermediate sizes of the block's MLPs: the dense one, or every expert's and the shared one's."""
        if not self.experts:
            return [self.intermediate]
        return [self.expert_intermediate] * self.experts + ([self.shared_intermediate] if self.shared_intermediate else [])

    def inputs(self) -> tuple[int, ...]:
        """Widths of a block's distinct linear inputs: q/k/v, o, gate/up, down (every expert's own)."""
        return (self.hidden, self.q_dim) + tuple(w for i in self._mlps() for w in (self.hidden, i))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """A block's linears: name -> ``(in_features, out_features)`` (one expert stands for all)."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        i, mlp = (self.expert_intermediate, "mlp.experts.0.") if self.experts else (self.intermediate, "mlp.")
        return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (q, h), mlp + "gate_proj": (h, i), mlp + "up_proj": (h, i), mlp + "down_proj": (i, h)}

    def largest_linear(self) -> int:
        """Elements of the block's largest weight matrix."""
        return self.hidden * max(self._mlps() + [self.q_dim])

    def block_params(self) -> int:
        h, q = self.hidden, self.q_dim
        router = self.experts * h
        return h * q * 2 + h * self.kv_dim * 2 + sum(3 * h * i for i in self._mlps()) + router + 2 * h  # + 2 norms

    def linear_params(self) -> int:
        return self.block_params() - 2 * self.hidden - self.experts * self.hidden

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
    allocator: int = 0  # CPU runs: freed memory glibc keeps until the runner trims it (calibration/host.py)

    @property
    def device_peak(self) -> int:
        return self.block_weights + self.activations + self.statistics + self.workspace + self.allocator

    @property
    def host_peak(self) -> int:
        return (self.host_model + self.host_quantized + self.host_activations
                + (self.device_peak if self.same_memory else 0))

    def table(self) -> str:
        rows = [("block weights", self.block_weights), ("activations", self.activations),
                ("statistics", self.statistics), ("workspace", self.workspace)]
        rows += [("freed, kept by malloc", self.allocator)] if self.allocator else []
        rows += [(f"peak on {self.device}", self.device_peak)]
        rows += [("host: model weights", self.host_model), ("host: quantized blocks", self.host_quantized)]
        rows += ([("peak on host (device is the host)", self.host_peak)] if self.same_memory else
                 [("host: block inputs/outputs", self.host_activations), ("peak on host", self.host_peak)])
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{w}}  {b / GIB:10.3f} GiB" for name, b in rows)


def load_config(model: str) -> Any:
    """The model's ``transformers`` config, without loading weights."""
    from transformers import AutoConfig

    from .models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))


def _steps(method: Any) -> list:
    """The recipe's algorithm instances (``method``: built steps, or anything ``build_recipe`` takes)."""
    from .algorithms.base import Algorithm
    from .config import build_recipe

    if isinstance(method, (list, tuple)) and method and all(isinstance(m, Algorithm) for m in method):
        return list(method)
    return build_recipe(method, {})


def estimate(
    shape: ModelShape,
    method: Any = "gptq",
    num_samples: int = 128,
    seqlen: int = 512,
    batch_size: int = 8,
    pipeline: str = "sequential",
    device: str = "cpu",
    offload_activations: bool = False,
    dtype: torch.dtype = torch.float32,
    host_weights_budget: int | None = None,
) -> MemoryEstimate:
    """Peak memory of ``ptqkit.quantize`` with these settings (see the module docstring); ``method``
    is a recipe (names, ``"smoothquant+gptq"``) or its built steps.

    ``host_weights_budget``: the model is disk-offloaded (``--offload-folder``) with at most this many
    bytes of its weights in host memory (0: only what lies outside the decoder blocks); the quantized
    blocks (≈ 4 bits per weight) accumulate next to it."""
    check_positive(num_samples=num_samples, seqlen=seqlen, batch_size=batch_size)
    if pipeline not in ("sequential", "two-pass", "fp-outputs"):
        raise ValueError(f"pipeline={pipeline!r}: choose sequential or two-pass (plan.choose resolves auto)")
    pipeline = "two-pass" if pipeline == "two-pass" else "sequential"  # fp-outputs holds what sequential does
    seq = pipeline == "sequential"
    steps = _steps(method)
    e = torch.empty((), dtype=dtype).element_size()
    s, h, i = shape, shape.hidden, shape.intermediate
    tokens, per_batch = num_samples * seqlen, min(batch_size, num_samples) * seqlen
    batches = -(-num_samples // batch_size)
    data_free = not any(st.needs_data for st in steps)
    same = torch.device(device).type == "cpu"

    block = s.block_params() * e + s.linear_params() * e + s.linear_params() // 2  # fp, dequantized, packed
    live = max(3 * h + 2 * s.kv_dim, 2 * h + i)           # values per token alive at the worst pause
    transient = per_batch * (h + i) * e                   # the batch that computes meanwhile
    threads = (batches if seq else 1) * (CPU_THREAD[0] + CPU_THREAD[1] * (h + i))
    held = tokens if seq else per_batch                   # tokens whose live set is held at a pause
    if data_free:
        inout, inter = 0, 0
    elif same:  # the host: inputs, and the live set of every paused batch (sequential) or of one (two-pass)
        inout = 0
        inout_host = tokens * h * e * (1 if seq else 2)
        inter = inout_host + held * live * e + transient + threads + CPU_FIXED
    else:
        inout = 2 * tokens * h * e                        # block inputs + outputs
        inter = held * live * e + transient
    mem = [st.memory(s, tokens, batches, pipeline) for st in steps]
    on_host = offload_activations and not same
    full, outside = s.total_params() * e, (s.total_params() - s.layers * s.block_params()) * e  # outside the blocks
    host_model = full if host_weights_budget is None else min(full, max(host_weights_budget, outside))
    est = MemoryEstimate(
        device=str(device), block_weights=block, activations=inter + (0 if on_host else inout),
        statistics=sum(m.statistics for m in mem), workspace=max(m.workspace for m in mem),
        host_model=host_model, host_activations=inout if on_host else 0,
        same_memory=same, host_quantized=s.layers * s.linear_params() // 2)
    if same and not data_free:  # what glibc keeps of the freed memory, as the runner lets it (host.slack)
        from .calibration import host

        est.allocator = int(host.slack() * est.device_peak)
    return est


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from ``20GiB``, ``500MB`` or an integer (accelerate's ``max_memory`` notation)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        n = int(convert_file_size_to_int(size))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} {size!r} is not a memory size: write e.g. 20GiB or 500MB") from e
    if n <= 0:
        raise ValueError(f"{what} {size!r} must be positive")
    return n


def free_memory(device: str) -> tuple[int, int | None]:
    """``(free host bytes, free device bytes or None for a CPU run)``: psutil's available memory (``MemAvailable``
    on Linux)."""
    import psutil

    avail = psutil.virtual_memory().available
    dev = torch.device(device)
    return avail, (torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None)


# ------------------------------------------------------------------------- measurement
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


class PeakMemory:
    """Peak resident memory (Linux) while the ``with`` block runs: ``peak_mb`` (RSS at its highest),
    ``extra_mb`` (above the level at entry) and, when CUDA is in use, ``cuda_mb`` (peak allocation).

    Exact where the kernel lets the process reset its high-water mark (``/proc/self/clear_refs``, then
    ``VmHWM``); sampled every ``interval`` seconds otherwise. On entry freed heap pages go back to the
    OS (``malloc_trim``), so the level at entry is what is live."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.start, self.peak, self.cuda_mb = interval, 0, 0, None
        self._stop, self._thread, self._exact = threading.Event(), None, False

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        from .calibration import host

        host.release_free()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.start = self.peak = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = True
        except OSError:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, _hwm() if self._exact else _rss())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def peak_memory_mb() -> dict[str, float]:
    """The process's lifetime peak host RSS (``ru_maxrss``) and, when CUDA is in use, peak CUDA allocation, in MiB."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host_rss": rss / (1024**2 if sys.platform == "darwin" else 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated() / 1024**2
    return out
