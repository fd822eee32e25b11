"""Class-level method wrapping with an exact undo.

Hand-written rather than ``wrapt`` because the hooks sit on the per-checkout path, where a plain
closure costs a fraction of a generic proxy, and all we need is "replace, remember, restore".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from .log import errors

Undo = Callable[[], None]


def wrap_method(
    cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Undo:
    """Replace ``cls.name`` by ``make(original)``; the returned function restores it exactly."""
    had_own = name in vars(cls)
    original = getattr(cls, name)
    wrapper = make(original)
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(wrapper, attr, getattr(original, attr))
    setattr(cls, name, wrapper)

    def undo() -> None:
        if vars(cls).get(name) is wrapper:
            if had_own:
                setattr(cls, name, original)
            else:
                delattr(cls, name)

    return undo


def watch_new_instances(agent: Any, probe: str, watch: Callable[..., Any]) -> Callable[..., Any]:
    """A ``make`` for ``wrap_method(cls, "__init__", make)``: every instance built while the agent
    is discovering is handed to ``watch(agent, instance)``; a failure there is counted, never
    raised into the constructor's caller."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if agent.discovering:
                try:
                    watch(agent, self)
                except Exception as exc:
                    errors.record(probe, exc)

        return __init__

    return make


def subclasses(cls: type) -> list[type]:
    """``cls`` and every subclass known now, depth first."""
    seen, stack = [], [cls]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.append(current)
            stack.extend(current.__subclasses__())
    return seen
