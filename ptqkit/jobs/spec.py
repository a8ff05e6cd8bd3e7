"""Job and batch files: schema dataclasses, YAML with line numbers, validation before any model loads.

A job file (``ptqkit run job.yaml``) is one mapping of :class:`JobSpec` fields; a batch file
(``ptqkit batch jobs.yaml``) is ``{defaults: {...}, jobs: [...]}`` (or a plain list of jobs), each
job inheriting ``defaults`` (sections such as ``calibration`` merge key by key). Every problem is
reported at once as ``file:line: message`` (line numbers from ``yaml.compose``'s node marks).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from ..calibration.runner import PIPELINES
from ..config import build_recipe
from ..formats import SAVERS
from ..models import DEFAULT_MODEL

HUB_SOURCES = ("builtin", "wikitext2", "c4", "pile-val")


# ----------------------------------------------------------------------------- schema
@dataclass
class CalibrationSpec:
    """Calibration windows (``ptqkit.calibration.data.load_calibration``)."""

    source: str = "builtin"
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass
class EvaluationSpec:
    """Evaluation protocol (``ptqkit.evaluate``): non-overlapping windows of ``seqlen`` tokens."""

    dataset: str = "builtin"
    seqlen: int = 2048
    max_windows: Optional[int] = None


@dataclass
class OutputSpec:
    """Where the job writes (default ``ptqkit-out/<name>``) and the checkpoint format (null: report only)."""

    dir: Optional[str] = None
    format: Optional[str] = "native"


@dataclass
class JobSpec:
    """One job: model, calibration, recipe steps (+ options routed to them), evaluation, output."""

    # required: "gptq", "smoothquant+gptq", a recipe .yaml, or [awq, {method: gptq, act_order: true}]
    recipe: Union[str, list] = None  # type: ignore[assignment]
    name: Optional[str] = None
    model: str = DEFAULT_MODEL
    options: dict = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)  # layer names or re: regexes kept in full precision
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: Optional[EvaluationSpec] = field(default_factory=EvaluationSpec)  # false / null: skip
    output: OutputSpec = field(default_factory=OutputSpec)
    batch_size: int = 8
    pipeline: str = "sequential"
    device: Optional[str] = None
    source_file: str = field(default="<dict>", metadata={"yaml": False})
    source_lines: dict = field(default_factory=dict, metadata={"yaml": False}, repr=False)

    def at(self, *paths: str) -> str:
        """``file:line`` of the first of ``paths`` found (``""`` = the job itself)."""
        line = next((self.source_lines[p] for p in paths + ("",) if p in self.source_lines), None)
        return f"{self.source_file}:{line}" if line else self.source_file

    def spec(self) -> dict[str, Any]:
        """The job as plain data (what determines its result; no source positions)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in ("source_file", "source_lines")}


class SpecError(ValueError):
    """Every problem found in job/recipe files (``file:line: message``) or a comparison's methods, one per line."""

    def __init__(self, problems: list[str], what: str = "job file") -> None:
        self.problems = problems
        super().__init__(f"invalid {what}:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- YAML with line numbers
def _value(node: Node) -> Any:
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _index_lines(node: Node, prefix: str, lines: dict[str, int]) -> None:
    """Record the line of ``node`` and of everything under it as ``a.b[2].c`` paths."""
    lines.setdefault(prefix, _line(node))
    if isinstance(node, MappingNode):
        for k, v in node.value:
            lines.setdefault(f"{prefix}.{_value(k)}".lstrip("."), _line(k))
            _index_lines(v, f"{prefix}.{_value(k)}".lstrip("."), lines)
    elif isinstance(node, SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, f"{prefix}[{i}]", lines)


def _items(node: MappingNode, file: str, problems: list[str]) -> dict[str, tuple[Node, Node]]:
    out: dict[str, tuple[Node, Node]] = {}
    for k, v in node.value:
        key = _value(k)
        if key in out:
            problems.append(f"{file}:{_line(k)}: duplicate field {key!r} (first at line {_line(out[key][0])})")
        out[key] = (k, v)
    return out


def _conforms(value: Any, hint: Any) -> bool:
    if get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return any(_conforms(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if get_origin(hint) is list and get_args(hint):
        return isinstance(value, list) and all(_conforms(v, get_args(hint)[0]) for v in value)
    return isinstance(value, get_origin(hint) or hint)


def _type_name(hint: Any) -> str:
    args = get_args(hint)
    if get_origin(hint) is list:
        return "a list of " + (_type_name(args[0])[2:] + "s" if args else "values")
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an integer", str: "a string", list: "a list", dict: "a mapping", type(None): "null"}.get(
        hint, f"a {getattr(hint, '__name__', hint)} mapping")


def _section(hint: Any) -> type | None:
    return next((a for a in (hint, *get_args(hint)) if dataclasses.is_dataclass(a)), None)


def _fill(cls: type, nodes: list[MappingNode], file: str, problems: list[str], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from mapping nodes (later ones override), type-checked."""
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]
    merged: dict[str, list[tuple[Node, Node]]] = {}
    for node in nodes:
        for key, kv in _items(node, file, problems).items():
            merged.setdefault(key, []).append(kv)
    kw: dict[str, Any] = {}
    for key, kvs in merged.items():
        knode, vnode = kvs[-1]
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{file}:{_line(knode)}: unknown field '{prefix}{key}': {hint}valid fields: {known}")
            continue
        sub, maps = _section(hints[key]), [v for _, v in kvs if isinstance(v, MappingNode)]
        if sub is not None and isinstance(vnode, MappingNode):
            kw[key] = _fill(sub, maps, file, problems, f"{prefix}{key}.")
            continue
        value = _value(vnode)
        if key == "options" and isinstance(vnode, MappingNode):
            value = {k: v for m in maps for k, v in _value(m).items()}  # defaults' options, then the job's
        if sub is not None and value is False and type(None) in get_args(hints[key]):
            value = None  # ``evaluation: false``
        if not _conforms(value, hints[key]):
            problems.append(f"{file}:{_line(vnode)}: {prefix}{key} must be {_type_name(hints[key])}, got {value!r}")
            continue
        kw[key] = value
    return cls(**kw)


def _compose(path: Path) -> Node | None:
    try:
        return yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from e


def load_jobs(path: str | os.PathLike) -> list[JobSpec]:
    """Parse and validate a job or batch file; raises :class:`SpecError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    file, problems = str(path), []
    root = _compose(path)
    defaults: list[MappingNode] = []
    if isinstance(root, MappingNode) and any(_value(k) in ("jobs", "defaults") for k, _ in root.value):
        top = _items(root, file, problems)
        for key, (k, _) in top.items():
            if key not in ("jobs", "defaults"):
                problems.append(f"{file}:{_line(k)}: unknown top-level field {key!r}: "
                                "a batch file has 'defaults' and 'jobs'")
        if "defaults" in top:
            if not isinstance(top["defaults"][1], MappingNode):
                problems.append(f"{file}:{_line(top['defaults'][1])}: 'defaults' must be a mapping of job fields")
            else:
                defaults = [top["defaults"][1]]
        root = top["jobs"][1] if "jobs" in top else None
    nodes = root.value if isinstance(root, SequenceNode) else [root] if isinstance(root, MappingNode) else None
    if not nodes:
        raise SpecError(problems + [f"{file}: expected a job (a mapping with model, recipe, ...), a list of jobs, "
                                    "or {defaults: ..., jobs: [...]}"])
    jobs = []
    for node in nodes:
        if not isinstance(node, MappingNode):
            problems.append(f"{file}:{_line(node)}: a job must be a mapping (model, recipe, options, ...), "
                            f"got {_value(node)!r}")
            continue
        job = _fill(JobSpec, defaults + [node], file, problems)
        job.source_file = file
        for n in defaults + [node]:
            lines: dict[str, int] = {}
            _index_lines(n, "", lines)
            job.source_lines.update(lines)
        job.source_lines[""] = _line(node)
        validate_job(job, problems)
        jobs.append(job)
    _check_unique(jobs, problems)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))  # a problem in ``defaults`` is found once per job
    return jobs


# ----------------------------------------------------------------------------- validation
def parse_options(pairs: Iterable[str], where: str = "--option") -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict, each value read as YAML (``true``, ``0.5``, ``null``, ``text``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = (x.strip() for x in pair.partition("="))
        if not sep or not key:
            raise ValueError(f"{where}: expected KEY=VALUE (e.g. act_order=true), got {pair!r}")
        if key in out:
            raise ValueError(f"{where}: option {key!r} is given twice")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: the value of {key!r} is not valid YAML: {value!r}") from e
    return out


def recipe_steps(recipe: str | list) -> Any:
    """A job's ``recipe`` as ``build_recipe`` takes it: a list of steps, or a YAML recipe path."""
    if isinstance(recipe, list) or recipe.endswith((".yaml", ".yml")):
        return recipe
    return [s.strip() for s in re.split(r"[+,]", recipe) if s.strip()]


def _blame(job: JobSpec, message: str, candidates: list[str], fallback: str) -> str:
    """The ``file:line`` of the first candidate path whose last name the error message quotes."""
    head = message.split("valid")[0]  # before the list of valid names
    for path in candidates:
        leaf = re.split(r"[.\[]", path)[-1]
        if re.search(rf"(\b{re.escape(leaf)}=|'{re.escape(leaf)}')", head):
            return job.at(path)
    return job.at(fallback)


def _check_recipe(job: JobSpec, problems: list[str]) -> None:
    steps = recipe_steps(job.recipe)
    if isinstance(steps, list):  # grow the recipe step by step: the first failing prefix names the step
        for i in range(1, len(steps) + 1):
            try:
                build_recipe(steps[:i], {})
            except ValueError as e:
                keys = [p for p in job.source_lines if p.startswith(f"recipe[{i - 1}].")]
                problems.append(f"{_blame(job, str(e), keys, f'recipe[{i - 1}]')}: recipe step {i}: {e}")
                return
    try:
        built = build_recipe(steps, job.options)
    except (ValueError, FileNotFoundError) as e:
        keys = [p for p in job.source_lines if p.startswith("options.")]
        problems.append(f"{_blame(job, str(e), keys, 'options' if job.options else 'recipe')}: {e}")
        return
    if not job.name:
        q = built[-1].config
        grid = f"w{q.bits}" + ("pc" if q.group_size == -1 else f"g{q.group_size}")
        job.name = "+".join(s.name for s in built) + "-" + grid


def validate_job(job: JobSpec, problems: list[str]) -> None:
    """Semantic checks of a parsed job (appends ``file:line: message`` problems); fills defaults."""
    if job.recipe in (None, [], ""):
        if job.recipe is not None or "recipe" not in job.source_lines:  # else: its bad type is reported
            problems.append(f"{job.at('recipe')}: the job has no 'recipe' (e.g. recipe: gptq, or recipe: [awq, rtn])")
    else:
        _check_recipe(job, problems)
    positive = {"calibration.num_samples": job.calibration.num_samples, "calibration.seqlen": job.calibration.seqlen,
                "batch_size": job.batch_size}
    if job.evaluation is not None:
        positive.update({"evaluation.seqlen": job.evaluation.seqlen - 1,  # one token to predict
                         "evaluation.max_windows": job.evaluation.max_windows})
    for key, v in positive.items():
        if isinstance(v, int) and v < 1:
            need = "at least 2" if key == "evaluation.seqlen" else "positive"
            problems.append(f"{job.at(key)}: {key} must be {need}")
    for key, src in (("calibration.source", job.calibration.source),
                     ("evaluation.dataset", job.evaluation.dataset if job.evaluation else "builtin")):
        if src not in HUB_SOURCES and not Path(src).is_file():
            problems.append(f"{job.at(key)}: {key} {src!r} is neither one of {HUB_SOURCES} nor an existing file")
    if job.pipeline not in PIPELINES:
        problems.append(f"{job.at('pipeline')}: pipeline {job.pipeline!r}: use one of {PIPELINES}")
    if job.output.format is not None and job.output.format not in SAVERS:
        problems.append(f"{job.at('output.format')}: format {job.output.format!r}: use one of {sorted(SAVERS)} or null")
    looks_local = job.model.startswith((".", "/", "~")) or job.model.endswith(".gguf")
    if looks_local and not Path(job.model).expanduser().exists():
        problems.append(f"{job.at('model')}: model {job.model!r} does not exist: give a directory, a .gguf file, "
                        f"a hub id or {DEFAULT_MODEL!r}")
    if job.name and job.output.dir is None:
        job.output.dir = str(Path("ptqkit-out") / job.name)


def _check_unique(jobs: list[JobSpec], problems: list[str]) -> None:
    """Each job needs its own name and output directory (a shared name is reported once)."""
    names: dict[str, JobSpec] = {}
    dirs: dict[str, JobSpec] = {}
    for job in jobs:
        if job.name is not None and job.name in names:
            problems.append(f"{job.at('name')}: name {job.name!r} is already used by the job at "
                            f"{names[job.name].at()}: give each job its own")
        elif job.output.dir is not None and job.output.dir in dirs:
            problems.append(f"{job.at('output.dir', 'name')}: output dir {job.output.dir!r} is already used by the "
                            f"job at {dirs[job.output.dir].at()}: give each job its own")
        names.setdefault(job.name, job)
        dirs.setdefault(job.output.dir, job)
