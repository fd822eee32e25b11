"""Class-level method wrapping with an exact undo, placed only on a target that was checked.

Hand-written rather than ``wrapt`` because the hooks sit on the per-checkout path, where a plain
closure costs a fraction of a generic proxy, and all we need is "check, replace, remember,
restore".

A probe's ``install()`` places every hook through :class:`Hooks`. Before a method is replaced,
it is checked against the shape its wrapper assumes, written like a signature::

    hooks.wrap(Pool, "_acquire", make_acquire, "async (self, timeout)")

The target must be defined by that class itself (a method it merely inherits is not the one the
wrapper means: wrapping it would shadow the class's own under another name), be callable, be a
coroutine function exactly when ``async`` is written,
and take those parameters in that order (names after ``*`` as keywords); ``...`` at the end lets
any further parameters follow, else the ones that follow must have defaults. A library release
that renamed or reshaped the method raises :class:`TargetChanged` before anything of it is
touched, and the agent then undoes what the probe already placed (``Hooks.undo``): the probe is
off, with one counted error and one log line, and the app runs as without poolwatch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from ._log import errors
from ._types import Host, Undo

Make = Callable[[Callable[..., Any]], Callable[..., Any]]


class TargetChanged(Exception):
    """A method a probe hooks is missing, or not of the shape its wrapper assumes."""


def wrap_method(cls: type, name: str, make: Make) -> Undo:
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


def check_target(cls: type, name: str, shape: str) -> None:
    """Raise :class:`TargetChanged` unless ``cls.name`` has ``shape`` (see the module's doc)."""
    where = f"{cls.__module__}.{cls.__qualname__}.{name}"
    own = vars(cls).get(name)
    if own is None:  # gone, or only inherited now
        raise TargetChanged(f"{where} is missing")
    if isinstance(own, staticmethod | classmethod):
        raise TargetChanged(f"{where} is a {type(own).__name__}, the probe wraps a method")
    target = getattr(cls, name)
    if not callable(target):
        raise TargetChanged(f"{where} is not callable")
    wants_async = shape.startswith("async ")
    if inspect.iscoroutinefunction(target) != wants_async:
        kind = "a coroutine function" if wants_async else "a plain function"
        raise TargetChanged(f"{where} is no longer {kind}")
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        raise TargetChanged(f"{where} has no signature to check") from None
    names = [n.strip() for n in shape.removeprefix("async ").strip("() ").split(",")]
    rest = names[-1] == "..."
    names = names[:-1] if rest else names
    positional: tuple[inspect._ParameterKind, ...] = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    changed = TargetChanged(f"{where} takes {_shown(parameters)}, the probe expects {shape}")
    kinds, index = positional, 0
    for wanted in names:
        if wanted == "*":  # the names that follow are passed as keywords
            kinds = by_keyword
            continue
        if index >= len(parameters):
            raise changed
        found = parameters[index]
        if found.name != wanted or found.kind not in kinds:
            raise changed
        index += 1
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if not rest and any(
        p.default is p.empty and p.kind not in variadic for p in parameters[index:]
    ):
        raise changed  # a parameter the wrapper would not pass


def _shown(parameters: list[inspect.Parameter]) -> str:
    return f"({', '.join(str(p.replace(annotation=p.empty, default=p.empty)) for p in parameters)})"


class Hooks:
    """Places one probe's class-level hooks, each after checking its target, and remembers how
    to take every one of them off again (:meth:`undo`, in reverse order)."""

    def __init__(self, probe: str, library: str | None = None) -> None:
        self.probe = probe  # the label its errors are counted under
        self.library = library  # "asyncpg 0.32.0": said in the log line of a lost feature
        self.undos: list[Undo] = []

    def wrap(
        self, cls: type, name: str, make: Make, params: str, *, override: bool = False
    ) -> None:
        """Wrap ``cls.name`` (checked against ``params``, see the module's doc) with
        ``make(original)``. Raises :class:`TargetChanged`: the probe cannot run without it.
        ``override=True``: a subclass's override of a method wrapped on its base, if it has
        one (else nothing to do)."""
        if override and name not in vars(cls):
            return
        check_target(cls, name, params)
        self.undos.append(wrap_method(cls, name, make))

    def require(self, cls: type, name: str, params: str) -> None:
        """Check ``cls.name`` as :meth:`wrap` would, without wrapping it: a base class whose
        subclasses' overrides are wrapped (``override=True``) must still have the method."""
        check_target(cls, name, params)

    def feature(self, cls: type, name: str, make: Make, params: str) -> bool:
        """Like :meth:`wrap`, for a hook one series needs and the probe can run without: a target
        that changed leaves that series out (one counted error, one log line); False then."""
        try:
            self.wrap(cls, name, make, params)
        except TargetChanged as exc:
            where = f" ({self.library})" if self.library else ""
            errors.degraded(
                self.probe,
                f"poolwatch: part of the {self.probe} probe is off: {exc}{where}; the series "
                "that hook records are left out, the probe's others are exported.",
            )
            return False
        return True

    def on_undo(self, undo: Undo) -> None:
        """Run ``undo`` with the others (state the probe set up beside its wrappers)."""
        self.undos.append(undo)

    def undo(self) -> None:
        undos, self.undos = self.undos, []
        for undo in reversed(undos):
            try:
                undo()
            except Exception as exc:
                errors.record(self.probe, exc)


def watch_new_instances(agent: Host, probe: str, watch: Callable[..., Any]) -> Make:
    """A ``make`` for ``hooks.wrap(cls, "__init__", make, "(self, ...)")``: every instance built
    while the agent is discovering is handed to ``watch(agent, instance)``; a failure there is
    counted, never raised into the constructor's caller."""

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
    seen: list[type] = []
    stack = [cls]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.append(current)
            stack.extend(current.__subclasses__())
    return seen
