"""Run a function once a library has been imported: a probe loads only for a library the app uses.

Importing SQLAlchemy and aiohttp costs ~0.2 s of CPU each; an app that uses neither should not
pay that in every process (each pre-fork worker, each test-suite worker) for poolwatch's probes.
So at ``instrument()`` a probe whose library is not imported yet waits here, and is installed the
moment the app imports it. No instance of the library's classes can exist before then, so a
late probe needs no heap walk: its creation hooks see every one.

Hand-written (~40 lines) rather than ``wrapt.importer``: that one cannot take a hook back
(``uninstrument()`` must leave nothing behind) and costs ~0.4 s to import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ._types import Undo


class _AfterImport(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` while something waits: for a waited-for top-level module it
    returns the spec the other finders find, its loader wrapped to call back after the module
    ran."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Callable[[], None]]] = {}
        self.lock = threading.Lock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, self)  # type: ignore[assignment]
        return spec

    def loaded(self, name: str) -> None:
        with self.lock:
            callbacks = self.waiting.pop(name, [])
            if not self.waiting and self in sys.meta_path:
                sys.meta_path.remove(self)
        for callback in callbacks:
            callback()  # each catches and counts its own errors (the agent's probe install)


class _ThenCall:
    """The library's own loader, plus a call back once the module has run. The module is given
    its real loader back before anyone else sees it."""

    def __init__(self, loader: Any, finder: _AfterImport) -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        self._finder.loaded(module.__name__)


_finder = _AfterImport()


def after_import(library: str, callback: Callable[[], None]) -> Undo:
    """Call ``callback()`` once ``library`` (a top-level module not imported yet) has been
    imported, in the importing thread. The returned function takes the wait back."""
    with _finder.lock:
        _finder.waiting.setdefault(library, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)

    def undo() -> None:
        with _finder.lock:
            callbacks = _finder.waiting.get(library, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                _finder.waiting.pop(library, None)
            if not _finder.waiting and _finder in sys.meta_path:
                sys.meta_path.remove(_finder)

    return undo
