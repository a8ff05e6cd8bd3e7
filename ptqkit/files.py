"""Writing what a user keeps: nothing of theirs is lost, every file and directory appears whole or not at all.

- :func:`check_output`: before any work, refuse an output path that would lose files: an existing file,
  the current directory or one above it, the input model's directory, a directory that is not ptqkit's
  own output, or anything existing without ``overwrite``; and an unwritable parent.
- :func:`atomic_file` / :func:`write_text` / :func:`write_json`: a temporary file beside the target,
  renamed over it when complete.
- :func:`atomic_dir`: a temporary directory beside the target, put in place when complete by one
  atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, and the next write to
  that path restores the old directory if a kill fell between them). Leftovers of a writer that died
  are removed by the next write to the same path.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

#: files that mark a directory as ptqkit's own output (a checkpoint, a job's output, a comparison)
MARKERS = ("ptqkit_report.json", "ptqkit_quant.json", "ptqkit_job.json", "results.json")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def plain_mode(path: Path, directory: bool = False) -> None:
    """Give a ``mkstemp``/``mkdtemp`` result (0600/0700) the mode a plain ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 what: str = "output") -> Path:
    """``path`` resolved, or a ``ValueError`` naming the problem and the fix (see the module docstring)."""
    out = Path(path).expanduser().resolve()
    clean_stale(out)  # a write that was killed between its two renames: its old directory is back first
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"{what} {path} is the current directory or one above it: write to a new directory")
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{what} {path} is or contains the input model {src}: write somewhere else")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {path} is an existing file: give a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).is_file() for m in MARKERS):
            raise ValueError(f"{what} {path} exists and is not a ptqkit output (no {MARKERS[0]}): ptqkit never "
                             "replaces it; write to a new directory")
        if not overwrite:
            raise ValueError(f"{what} {path} already holds a ptqkit output: pass --overwrite (overwrite=True) to "
                             "replace it, or write to a new directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not writable")
    return out


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp``; it replaces ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    plain_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, ``None`` when there is no such file; a clear error when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): fix or remove it") from None


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return int(pid) != os.getpid()


def clean_stale(final: Path) -> None:
    """Undo what a killed writer of ``final`` left: restore its old directory if the new one never arrived,
    remove the temporary ones (of processes no longer running)."""
    if not final.parent.is_dir():
        return
    for p in sorted(final.parent.iterdir()):  # (not glob: a label such as gptq[act_order=false] has brackets)
        kind, _, pid = p.name.removeprefix(f".{final.name}.").partition("-")
        if not p.name.startswith(f".{final.name}.") or kind not in ("tmp", "old") or _alive(pid.split("-")[0]):
            continue
        if kind == "old" and not final.exists():
            log.warning("restoring %s, left by a write that was killed", final)
            os.replace(p, final)
        else:
            log.info("removing %s left by an interrupted write", p)
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    except (OSError, AttributeError):
        return False


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(path) as tmp:`` fill ``tmp``; it becomes ``path`` only when the block succeeds.
    An existing ``path`` stays until the new content is complete (callers check it may be replaced)."""
    final = Path(path).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    plain_mode(tmp, directory=True)
    try:
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
        elif not _exchange(tmp, final):  # exchanged: tmp holds the old content, removed below
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
