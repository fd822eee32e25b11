"""Several workers, one target: each worker publishes its exposition text into a shared
directory, and ``poolwatch exporter`` serves the live workers' files merged as one ``/metrics``.

The format is node_exporter's *textfile* one (docs/multiprocess.md says why, and its limits):
every second a daemon thread of the worker renders the same collector its own listener would
serve (prometheus_client's ``generate_latest``) and atomically replaces ``<dir>/<id>.prom``.
Liveness is an advisory ``flock`` the worker holds on ``<dir>/<id>.lock`` for its lifetime: the
kernel drops it the moment the process dies, so the exporter skips a dead worker's file at its
very next scrape (and removes it). A file not rewritten for ``stale_after`` seconds is skipped
too, for the cases a lock cannot tell (a frozen process, a forked child keeping the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from prometheus_client.core import Metric as PromFamily
from prometheus_client.parser import text_string_to_metric_families

from .._log import errors, logger
from ..metrics import EXPORTER_WORKERS, Point
from .prometheus import families

PUBLISH_INTERVAL = 1.0  # seconds between two renders of a worker's file
STALE_AFTER = 10.0  # seconds after which the exporter ignores a file that is not rewritten
_LOCK_WAIT = 0.2  # the exporter holds a worker's lock for microseconds only: longer means taken

_held_fds: set[int] = set()


def _close_in_child() -> None:
    # A child forked by the app (multiprocessing, os.fork) inherits the lock's open file; closing
    # the child's copy keeps the lock's lifetime the worker's own.
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class WorkerIdInUse(Exception):
    """Another live process publishes under the same worker id."""


def file_stem(worker: str) -> str:
    """The file name of a worker id: any character that could leave the directory is quoted."""
    stem = quote(worker, safe="")
    return "%2E" + stem[1:] if stem.startswith(".") else stem  # no hidden files


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def try_lock(path: str) -> int | None:
    """An exclusive flock on ``path`` (created if need be), or None if someone else holds it.
    Held until the returned fd is closed; closed in children forked meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            _held_fds.add(fd)
            return fd
        os.close(fd)  # its holder removed it meanwhile: lock the file now at that path


def release_lock(fd: int, path: str) -> None:
    """Remove ``path`` (while still locked, so no one else holds this inode) and unlock it."""
    if _same_file(fd, path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _held_fds.discard(fd)
    os.close(fd)


def _hold_lock(path: str) -> int:
    """An exclusive flock on ``path``, held until the returned fd is closed."""
    deadline = time.monotonic() + _LOCK_WAIT
    while (fd := try_lock(path)) is None:
        if time.monotonic() > deadline:
            raise WorkerIdInUse(path)
        time.sleep(0.01)  # start-up only: the exporter is probing this lock right now
    return fd


class Publisher:
    """The worker side: holds ``<id>.lock`` and rewrites ``<id>.prom`` every ``interval``."""

    def __init__(
        self,
        directory: str,
        worker: str,
        render: Callable[[], bytes],
        interval: float = PUBLISH_INTERVAL,
        *,
        start: bool = True,
    ) -> None:
        os.makedirs(directory, exist_ok=True)
        stem = file_stem(worker)
        self.path = os.path.join(directory, f"{stem}.prom")
        self._lock_path = os.path.join(directory, f"{stem}.lock")
        self._tmp_path = os.path.join(directory, f".{stem}.prom.tmp")  # hidden: never read
        self._render, self._interval = render, interval
        self._fd = _hold_lock(self._lock_path)
        try:  # fail now, at start-up, if files cannot be written here
            with open(self._tmp_path, "wb"):
                pass
            os.unlink(self._tmp_path)
        except BaseException:
            self._release()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolwatch-multiproc", daemon=True)
        if start:  # else the caller starts the thread (a subclass finishing its set-up)
            self._thread.start()

    def publish(self) -> None:
        data = self._render()
        with open(self._tmp_path, "wb") as f:
            f.write(data)
        os.replace(self._tmp_path, self.path)  # atomic: readers see the old or the new file

    def _run(self) -> None:
        # A thread, not a task: the file stays fresh while the event loop is blocked.
        while True:
            try:
                self.publish()
            except Exception as exc:  # e.g. disk full: keep the app running, retry next time
                errors.record("exporter", exc)
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for path in (self.path, self._tmp_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._release()

    def _release(self) -> None:
        release_lock(self._fd, self._lock_path)


# --- the exporter side ------------------------------------------------------------------------


def _alive(lock_path: str) -> bool:
    """True while a worker holds ``lock_path``. A dead worker's files are removed on the way."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        if _same_file(fd, lock_path):  # removed while locked: a new worker takes a fresh file
            directory, name = os.path.split(lock_path[: -len(".lock")])
            _remove(os.path.join(directory, f"{name}.prom"))
            _remove(os.path.join(directory, f".{name}.prom.tmp"))  # killed mid-write
            _remove(lock_path)
        return False
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. no write permission on the directory: skipping is enough
        errors.record("exporter", exc)


def live_files(directory: str, stale_after: float = STALE_AFTER) -> Iterator[tuple[str, str]]:
    """``(file stem, exposition text)`` of every live worker with a fresh file."""
    names = set(os.listdir(directory))
    now = time.time()
    for name in sorted(names):
        if name.startswith(".") or not name.endswith(".prom"):
            continue
        stem = name[: -len(".prom")]
        path = os.path.join(directory, name)
        if not _alive(os.path.join(directory, f"{stem}.lock")):
            if f"{stem}.lock" not in names:
                _remove_abandoned(path, now - stale_after)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                age = now - os.fstat(f.fileno()).st_mtime
                text = f.read()
        except FileNotFoundError:  # the worker stopped meanwhile
            continue
        if age > stale_after:
            _warn_once(stem, "worker is alive but its file is stale: skipped", age=round(age, 1))
            continue
        yield stem, text


def _remove_abandoned(path: str, older_than: float) -> None:
    """A file without a lock at all: removed once surely abandoned (not one being created)."""
    try:
        if os.stat(path).st_mtime < older_than:
            _remove(path)
    except FileNotFoundError:
        pass


def sweep(directory: str, stale_after: float = STALE_AFTER) -> None:
    """Remove the files of dead workers, including those that have no ``.prom`` file."""
    names = set(os.listdir(directory))
    older_than = time.time() - stale_after
    for name in names:
        if name.endswith(".lock"):
            _alive(os.path.join(directory, name))
        elif name.endswith(".prom") and f"{name[: -len('.prom')]}.lock" not in names:
            _remove_abandoned(os.path.join(directory, name), older_than)


_warned: set[tuple[str, str]] = set()


def _warn_once(stem: str, message: str, **fields: object) -> None:
    if (stem, message) not in _warned:
        _warned.add((stem, message))
        logger.warning(message, file=f"{stem}.prom", **fields)


class WorkersCollector:
    """prometheus_client collector serving every live worker's file, merged family by family.

    Each worker's text has its own ``# HELP``/``# TYPE`` lines; a family may appear once only in
    an exposition, so families are merged by name (the first one's help and type are kept).
    """

    def __init__(
        self,
        directory: str,
        stale_after: float = STALE_AFTER,
        local: Any = None,
        exclude: str | None = None,
    ) -> None:
        # local: a collector of this very process, served live and counted as a worker (a
        # pre-fork server's serving worker); exclude: its own file stem, never read.
        self.directory, self.stale_after = directory, stale_after
        self.local, self.exclude = local, exclude

    def collect(self) -> Iterator[PromFamily]:
        merged: dict[str, PromFamily] = {}
        workers = 0
        if self.local is not None:
            workers = 1
            merged = {family.name: family for family in self.local.collect()}
        try:
            files = list(live_files(self.directory, self.stale_after))
        except OSError as exc:  # the directory is gone or unreadable: /healthz says so too
            _warn_once(self.directory, "cannot read the multiproc directory", error=str(exc))
            files = []
        files = [(stem, text) for stem, text in files if stem != self.exclude]
        for stem, text in files:
            try:
                parsed = list(text_string_to_metric_families(text))
            except Exception as exc:  # not poolwatch's output: skip the file, not the scrape
                _warn_once(stem, "cannot parse the file: skipped", error=str(exc))
                continue
            workers += 1
            for family in parsed:
                have = merged.get(family.name)
                if have is None:
                    merged[family.name] = family
                elif have.type == family.type:
                    have.samples.extend(family.samples)
                else:
                    _warn_once(
                        stem,
                        "metric type differs from another worker's: skipped",
                        metric=family.name,
                        type=family.type,
                        other=have.type,
                    )
        yield from families([Point(EXPORTER_WORKERS, {}, workers)])
        yield from merged.values()
