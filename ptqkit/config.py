"""Recipes: ordered algorithm steps (transforms, then one quantizer) built from names, dicts or YAML.

Option routing (docs/design.md): a keyword option goes to every step whose config has a field of
that name; a name no step takes is an error. Per-step options come as dicts:
``[{"method": "smoothquant", "alpha": 0.8}, {"method": "gptq"}]``.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence, Union

from pydantic import ValidationError

from .algorithms.base import Algorithm, Quantizer, Transform
from .registry import get_algorithm

StepSpec = Union[str, dict]
MethodSpec = Union[str, Sequence[StepSpec]]


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


def _load_yaml(path: str) -> tuple[list[StepSpec], dict[str, Any]]:
    """A recipe file: a list of steps, or a mapping with ``recipe:`` (the steps) and ``options:`` (routed to
    the steps like keyword options); anything else in it is an error naming the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ValueError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
                         f"{getattr(e, 'problem', None) or e}") from None
    options: Any = {}
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"recipe", "options"})
        if unknown:
            raise ValueError(f"{path}: unknown top-level key(s) {unknown}: a recipe file has 'recipe' (the steps) "
                             "and optionally 'options'")
        data, options = data.get("recipe"), data.get("options") or {}
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a recipe file holds a non-empty list of steps (or a 'recipe:' key with one)")
    if not isinstance(options, dict):
        raise ValueError(f"{path}: 'options' must be a mapping of option names to values, got {options!r}")
    return data, options


def split_recipe(text: str) -> list[str]:
    """The step names of ``"smoothquant+gptq"`` or ``"awq,gptq"``."""
    return [m.strip() for m in re.split(r"[+,]", text) if m.strip()]


def _normalize(method: MethodSpec) -> tuple[list[dict], dict[str, Any]]:
    """Any method spec (a name, steps joined by ``+`` or ``,``, a YAML path, a list of steps) ->
    ``([{"method": name, **options}, ...], options of a recipe file)``."""
    if isinstance(method, str):
        if method.endswith((".yaml", ".yml")):
            steps, options = _load_yaml(method)
            return _normalize(steps)[0], options
        return [{"method": m} for m in split_recipe(method) or [method]], {}
    if not isinstance(method, (list, tuple)) or not method:
        raise ValueError(f"method must be a name, a YAML path or a non-empty list of steps, got {method!r}")
    for i, s in enumerate(method):
        if not (isinstance(s, str) or isinstance(s, dict) and isinstance(s.get("method"), str)):
            raise ValueError(f"recipe step {i}: expected a method name or a dict with a 'method' key, got {s!r}")
    return [{"method": s} if isinstance(s, str) else dict(s) for s in method], {}


def build_recipe(method: MethodSpec, options: dict[str, Any] | None = None) -> list[Algorithm]:
    """Instantiate the steps of a recipe with their configs, validating order and options.

    A transform with no quantizer after it gets ``rtn`` appended (``"awq"`` = AWQ then RTN). A recipe file's
    ``options`` apply like keyword ``options``, which win over them.
    """
    specs, file_options = _normalize(method)
    options = {**file_options, **(options or {})}  # keyword options (the command line) over the file's
    classes = [get_algorithm(s["method"]) for s in specs]
    kinds = [c.kind for c in classes]
    if kinds.count("quantizer") > 1:
        names = [c.name for c in classes if c.kind == "quantizer"]
        raise ValueError(f"a recipe takes one quantizer, got {names}: keep the last and drop the others")
    if "quantizer" in kinds and kinds.index("quantizer") != len(kinds) - 1:
        after = [c.name for c in classes[kinds.index("quantizer") + 1:]]
        raise ValueError(f"transform(s) {after} come after the quantizer: put transforms first")
    if "quantizer" not in kinds:
        specs.append({"method": "rtn"})
        classes.append(get_algorithm("rtn"))

    valid = set().union(*(_fields(c) for c in classes))
    unknown = set(options) - valid
    if unknown:
        raise ValueError(f"option(s) {sorted(unknown)} are not taken by any step of {[c.name for c in classes]}; "
                         f"valid options: {sorted(valid)}")
    implied = {k: v for c in classes if issubclass(c, Transform) for k, v in c.quantizer_defaults.items()}

    steps: list[Algorithm] = []
    for spec, cls in zip(specs, classes):
        own = {k: v for k, v in spec.items() if k != "method"}
        bad = set(own) - _fields(cls)
        if bad:
            raise ValueError(f"step {cls.name!r}: unknown option(s) {sorted(bad)}; valid: {sorted(_fields(cls))}")
        kw = {k: v for k, v in implied.items() if issubclass(cls, Quantizer) and k in _fields(cls)}
        kw.update({k: v for k, v in options.items() if k in _fields(cls)})
        kw.update(own)
        try:
            config = cls.Config(**kw)
        except ValidationError as e:
            raise ValueError(f"step {cls.name!r}: {describe(e)}") from None
        steps.append(cls(config))
    return steps


def grid_label(config: Any) -> str:
    """A run's grid in names: ``w4g128``, ``w4pc`` (per channel), ``w8a8`` (int8 activations too)."""
    if getattr(config, "activations", None):
        return "w8a8"
    return f"w{config.bits}" + ("pc" if config.group_size == -1 else f"g{config.group_size}")


def describe(e: ValidationError) -> str:
    """A pydantic validation error in one line: ``bits=9: input should be less than or equal to 8``."""
    parts: dict[str, list[str]] = {}
    for err in e.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{field}={err['input']!r}: " if field and not msg.startswith(field + "=") else ""
        parts.setdefault(where, []).append(msg[0].lower() + msg[1:] if msg else msg)
    return "; ".join(where + " or ".join(dict.fromkeys(msgs)) for where, msgs in parts.items())


def recipe_to_list(steps: Sequence[Algorithm]) -> list[dict[str, Any]]:
    """Serializable form of a built recipe (every option, defaults included)."""
    return [s.to_dict() for s in steps]
