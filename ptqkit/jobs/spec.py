"""Job and batch files: schema (pydantic dataclasses), YAML with line numbers, validation before any
model loads.

A job file (``ptqkit run job.yaml``) is one mapping of :class:`JobSpec` fields; a batch file
(``ptqkit batch jobs.yaml``) is ``{defaults: {...}, jobs: [...]}`` (or a plain list of jobs), each
job inheriting ``defaults`` (sections such as ``calibration`` merge key by key). Types are checked
strictly by pydantic; every problem is reported at once as ``file:line: message`` (line numbers from
``yaml.compose``'s node marks).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from yaml.nodes import MappingNode, Node, SequenceNode

from ..calibration.runner import PIPELINES
from ..config import build_recipe, grid_label, split_recipe
from ..formats import FORMATS
from ..models import DEFAULT_MODEL

HUB_SOURCES = ("builtin", "wikitext2", "c4", "pile-val")
_STRICT = ConfigDict(extra="forbid", strict=True)


# ----------------------------------------------------------------------------- schema
@dataclass(config=_STRICT)
class CalibrationSpec:
    """Calibration windows (``ptqkit.calibration.data.load_calibration``)."""

    source: str = "builtin"
    num_samples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass(config=_STRICT)
class EvaluationSpec:
    """Evaluation protocol (``ptqkit.evaluate``): non-overlapping windows of ``seqlen`` tokens."""

    dataset: str = "builtin"
    seqlen: int = 2048
    max_windows: Optional[int] = None


@dataclass(config=_STRICT)
class OutputSpec:
    """Where the job writes (default ``ptqkit-out/<name>``) and the checkpoint format (null: report only)."""

    dir: Optional[str] = None
    format: Optional[str] = "auto"


@dataclass(config=_STRICT)
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
    pipeline: str = "auto"
    device: Optional[str] = None
    source_file: str = field(default="<dict>", metadata={"yaml": False})
    source_lines: dict = field(default_factory=dict, metadata={"yaml": False}, repr=False)

    def at(self, *paths: str) -> str:
        """``file:line`` of the first of ``paths`` found (``""`` = the job itself)."""
        line = next((self.source_lines[p] for p in paths + ("",) if p in self.source_lines), None)
        return f"{self.source_file}:{line}" if line else self.source_file

    def spec(self) -> dict[str, Any]:
        """The job as plain data (what determines its result; no source positions)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("source_file", "source_lines")}


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


def _index_lines(node: Node, prefix: str, lines: dict[str, int], file: str, problems: list[str]) -> None:
    """Record the line of ``node`` and of everything under it as ``a.b[2].c`` paths; duplicate keys are problems."""
    lines.setdefault(prefix, _line(node))
    if isinstance(node, MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            key = _value(k)
            if key in seen:
                problems.append(f"{file}:{_line(k)}: duplicate field {key!r} (first at line {seen[key]})")
            seen.setdefault(key, _line(k))
            path = f"{prefix}.{key}".lstrip(".")
            lines.setdefault(path, _line(k))
            _index_lines(v, path, lines, file, problems)
    elif isinstance(node, SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, f"{prefix}[{i}]", lines, file, problems)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _type_name(hint: Any) -> str:
    args = get_args(hint)
    if get_origin(hint) is list:
        return "a list of " + (_type_name(args[0])[2:] + "s" if args else "values")
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an integer", str: "a string", list: "a list", dict: "a mapping", type(None): "null"}.get(
        hint, f"a {getattr(hint, '__name__', hint)} mapping")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A job's fields over the defaults': sections (mappings) and ``options`` merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _problem(e: Any, data: dict[str, Any], at: Any) -> tuple[str, str]:
    """``(top-level field, message)`` for one pydantic error."""
    cls, path, value, hint = JobSpec, [], data, None
    for el in e["loc"]:
        if cls is None or not isinstance(el, str) or el not in _fields(cls) or not isinstance(value, dict):
            break
        path.append(el)
        hint, value = get_type_hints(cls)[el], value.get(el)
        cls = next((a for a in (hint, *get_args(hint)) if dataclasses.is_dataclass(a)), None)  # a section's class
    key = ".".join(path)
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        bad = str(e["loc"][len(path)])
        known = _fields(cls or JobSpec)
        close = difflib.get_close_matches(bad, known, n=1)
        hint_txt = f"did you mean {close[0]!r}? " if close else ""
        where = f"{key}.{bad}" if key else bad
        return path[0] if path else bad, f"{at(where)}: unknown field '{where}': {hint_txt}valid fields: {known}"
    return path[0], f"{at(key)}: {key} must be {_type_name(hint)}, got {value!r}"


def _build(data: dict[str, Any], at: Any, problems: list[str]) -> JobSpec:
    """A validated :class:`JobSpec`; fields with problems are reported and left at their defaults."""
    if data.get("evaluation") is False:
        data = {**data, "evaluation": None}  # ``evaluation: false``
    for key in ("source_file", "source_lines"):  # set by the loader, not by the file
        if key in data:
            problems.append(f"{at(key)}: unknown field '{key}': valid fields: {_fields(JobSpec)}")
            data = {k: v for k, v in data.items() if k != key}
    adapter = TypeAdapter(JobSpec)
    try:
        return adapter.validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        found = dict.fromkeys(_problem(e, data, at) for e in err.errors())
        problems += [msg for _, msg in found]
        bad = {f for f, _ in found}
        return adapter.validate_json(json.dumps({k: v for k, v in data.items() if k not in bad}, default=str))


def _compose(path: Path) -> Node | None:
    try:
        return yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from e


def _job_nodes(root: Node | None, file: str, problems: list[str]) -> tuple[list[MappingNode], list[Node]]:
    """``(defaults, jobs)`` nodes of a job or batch file."""
    defaults: list[MappingNode] = []
    if isinstance(root, MappingNode) and any(_value(k) in ("jobs", "defaults") for k, _ in root.value):
        top = {_value(k): (k, v) for k, v in root.value}
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
    return defaults, nodes


def load_jobs(path: str | os.PathLike) -> list[JobSpec]:
    """Parse and validate a job or batch file; raises :class:`SpecError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    file, problems = str(path), []
    defaults, nodes = _job_nodes(_compose(path), file, problems)
    jobs = []
    for node in nodes:
        if not isinstance(node, MappingNode):
            problems.append(f"{file}:{_line(node)}: a job must be a mapping (model, recipe, options, ...), "
                            f"got {_value(node)!r}")
            continue
        lines: dict[str, int] = {}
        data: dict[str, Any] = {}
        for n in defaults + [node]:
            own: dict[str, int] = {}
            _index_lines(n, "", own, file, problems)
            lines.update(own)
            data = _merge(data, _value(n))
        lines[""] = _line(node)
        at = lambda p: f"{file}:{lines.get(p, lines[''])}"  # noqa: E731
        job = _build(data, at, problems)
        job.source_file, job.source_lines = file, lines
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


def _blame(job: JobSpec, message: str, candidates: list[str], fallback: str) -> str:
    """The ``file:line`` of the first candidate path whose last name the error message quotes."""
    head = message.split("valid")[0]  # before the list of valid names
    for path in candidates:
        leaf = re.split(r"[.\[]", path)[-1]
        if re.search(rf"(\b{re.escape(leaf)}=|'{re.escape(leaf)}')", head):
            return job.at(path)
    return job.at(fallback)


def _check_recipe(job: JobSpec, problems: list[str]) -> None:
    if isinstance(job.recipe, list) or not job.recipe.endswith((".yaml", ".yml")):
        # grow the recipe step by step: the first failing prefix names the step
        steps = job.recipe if isinstance(job.recipe, list) else split_recipe(job.recipe)
        for i in range(1, len(steps) + 1):
            try:
                build_recipe(steps[:i], {})
            except ValueError as e:
                keys = [p for p in job.source_lines if p.startswith(f"recipe[{i - 1}].")]
                problems.append(f"{_blame(job, str(e), keys, f'recipe[{i - 1}]')}: recipe step {i}: {e}")
                return
    try:
        built = build_recipe(job.recipe, job.options)
    except (ValueError, FileNotFoundError) as e:
        keys = [p for p in job.source_lines if p.startswith("options.")]
        problems.append(f"{_blame(job, str(e), keys, 'options' if job.options else 'recipe')}: {e}")
        return
    if not job.name:
        job.name = "+".join(s.name for s in built) + "-" + grid_label(built[-1].config)


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
    if job.output.format is not None and job.output.format not in FORMATS:
        problems.append(f"{job.at('output.format')}: format {job.output.format!r}: use one of {FORMATS} or null")
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
