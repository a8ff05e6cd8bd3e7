"""Data-parallel calibration on ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole model and calibrates on its own contiguous shard of the calibration
samples (``shard``). Before an algorithm makes a decision it all-reduces the statistics that the
decision depends on (``all_reduce_``), so every rank makes the same decision and ends up with
bit-identical quantized weights; the block outputs each rank propagates stay local. Rank 0
writes checkpoints and reports (``is_main`` / ``barrier``).

Without a process group (a plain ``python`` run) every function here is a no-op or returns the
single-process answer, so the algorithms call the hooks unconditionally.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: a collective waits this long for the slowest rank (rank 0 may evaluate while the others wait)
TIMEOUT = datetime.timedelta(hours=2)
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer; launch with torchrun --nproc-per-node N") from None


def env_rank() -> int:
    """This process's rank as torchrun sets it; 0 outside a torchrun launch (a stray ``RANK`` alone does not
    make a run distributed)."""
    if env_world_size() <= 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} is not an integer; launch with torchrun") from None


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Start the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``.

    Returns whether the run is distributed. A group someone already started is used as it is.
    Backend: NCCL when ``device`` is CUDA, else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE>1 but {missing} are not set: launch with torchrun (it sets them), "
                         "or unset WORLD_SIZE for a single-process run")
    backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("distributed calibration: rank %d of %d (%s)", rank(), world_size(), backend)
    return is_distributed()


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` (one GPU per process); others unchanged."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` samples: rank r gets ``[r·n//W, (r+1)·n//W)``."""
    w, r = world_size(), rank()
    if n < w:
        raise ValueError(f"{n} calibration samples cannot be shared by {w} ranks: use num_samples >= {w} "
                         "(better a multiple of world_size times batch_size)")
    return slice(r * n // w, (r + 1) * n // w)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over all ranks (``op``: sum, max, min); a no-op in a single process.

    Works for tensors on any device: gloo reduces on the CPU, NCCL on the current GPU.
    """
    if op not in _OPS:
        raise ValueError(f"op={op!r}: use one of {sorted(_OPS)}")
    if not is_distributed():
        return t
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t if t.device == where and t.is_contiguous() else t.detach().to(where).contiguous()
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_float(value: float, op: str = "sum") -> float:
    """A Python number reduced over all ranks (float64)."""
    return float(all_reduce_(torch.tensor([float(value)], dtype=torch.float64), op)[0])


def all_gather_int(value: int) -> list[int]:
    """One integer from every rank, in rank order (``[value]`` in a single process)."""
    t = torch.zeros(world_size(), dtype=torch.int64)
    t[rank()] = int(value)
    return [int(v) for v in all_reduce_(t)]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
