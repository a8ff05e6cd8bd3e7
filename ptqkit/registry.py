"""Plugin registry of algorithms: ``@register("name")`` on an ``Algorithm`` subclass."""
from __future__ import annotations

from typing import Callable, TypeVar

ALGORITHMS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``name``."""

    def deco(cls: T) -> T:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ValueError(f"an algorithm named {name!r} is already registered ({ALGORITHMS[name].__name__})")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


def get_algorithm(name: str) -> type:
    """The algorithm class registered as ``name``; a clear error listing the known ones otherwise."""
    from . import algorithms  # noqa: F401  (importing registers the built-in algorithms)

    key = name.strip().lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[key]
