"""One target for every worker of a pre-fork server, with ``instrument(app)`` alone.

uvicorn ``--workers N``, gunicorn ``-w N`` with uvicorn workers and hypercorn ``--workers N`` run
N workers under one parent process. Each worker's agent joins a private directory named after
that parent and the metrics port, and reuses the sidecar's textfile machinery (multiproc.py):

- the worker holding the port serves its own series live plus every other live worker's file;
- the others publish their file every second; while nobody holds the ``.serving`` lock, one of
  them tries the port, so a worker takes over within a second when the serving one dies;
- the serving worker removes dead workers' files every few seconds, and the last worker to stop
  removes the directory.

Only real pre-fork workers join (``prefork_parent``); any other process keeps its single-process
listener, so two unrelated apps started by the same parent never merge their metrics.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import multiprocessing
import os
import stat
import sys
import tempfile
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from .._log import errors, logger
from .multiproc import (
    STALE_AFTER,
    Publisher,
    WorkersCollector,
    file_stem,
    release_lock,
    sweep,
    try_lock,
)
from .prometheus import MetricsServer, metrics_app

SERVING = ".serving"  # locked by the worker holding (or trying) the port; holds its worker id
SWEEP_EVERY = 5  # publish intervals between two sweeps of dead workers' files
LINGER = 3.0  # seconds a stopped hypercorn worker waits for the others to stop

# (module, function) of each server's worker entry point: in a worker it stays on the main
# thread's stack for the worker's whole life, under the event loop that runs the app.
_WORKER_ENTRIES: dict[tuple[str | None, str], str] = {
    ("uvicorn._subprocess", "subprocess_started"): "uvicorn",  # spawned by uvicorn --workers
    ("gunicorn.arbiter", "spawn_worker"): "gunicorn",  # forked by the arbiter
    ("hypercorn.asyncio.run", "asyncio_worker"): "hypercorn",
    ("hypercorn.asyncio.run", "uvloop_worker"): "hypercorn",
    ("hypercorn.trio.run", "trio_worker"): "hypercorn",
}


def prefork_parent() -> tuple[str, int] | None:
    """``(server name, parent pid)`` when this process is a worker of a pre-fork server.

    A test runner, supervisord, a shell script or ``multiprocessing.Process(target=uvicorn.run)``
    starting several apps is no pre-fork server: none of them runs an app under a worker entry
    point, so their apps stay single processes. uvicorn's ``--reload`` child is not either: the
    reloader runs one process at a time.
    """
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        server = _WORKER_ENTRIES.get((frame.f_globals.get("__name__"), frame.f_code.co_name))
        if server is not None:
            break
        frame = frame.f_back
    else:
        return None
    if server == "uvicorn" and getattr(frame.f_locals.get("config"), "should_reload", False):
        return None
    if server == "hypercorn" and multiprocessing.parent_process() is None:
        return None  # hypercorn --workers 0: the worker function runs in the parent itself
    parent = os.getppid()
    return None if parent == 1 else (server, parent)  # orphaned: the server is going away


def directory_for(parent: int, port: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"poolwatch-{os.geteuid()}-{parent}-{port}")


def _private_directory(path: str, create: bool = True) -> str:
    """Create ``path`` 0700, or accept it only if it is a directory of ours nobody else can
    write (the temporary directory is shared with other users)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(errno.EPERM, "not a private directory of this user", path)
    return path


def _remove_if_unused(directory: str, stale_after: float = STALE_AFTER) -> None:
    """Remove dead workers' files, then the directory if no live worker is left in it."""
    with contextlib.suppress(OSError):
        sweep(directory, stale_after)
        serving = os.path.join(directory, SERVING)
        if (fd := try_lock(serving)) is not None:  # left by a killed serving worker
            release_lock(fd, serving)
        os.rmdir(directory)


def _tidy(directory: str) -> None:
    """Remove what servers whose parent process is gone left in the temporary directory (all
    their workers killed, or stopped without a lifespan shutdown)."""
    base, prefix = os.path.dirname(directory), f"poolwatch-{os.geteuid()}-"
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            parent = entry.name.removeprefix(prefix).split("-")[0]
            if entry.name.startswith(prefix) and parent.isdigit() and not _alive(int(parent)):
                with contextlib.suppress(OSError):
                    _private_directory(entry.path, create=False)
                    _remove_if_unused(entry.path, stale_after=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def join(server: str, directory: str, worker: str, own: Any, settings: Any) -> SharedTarget:
    """This worker's :class:`SharedTarget`. Raises ``OSError`` when the directory is unusable,
    ``multiproc.WorkerIdInUse`` when a live worker has the same id."""
    address = (settings.metrics_addr, settings.metrics_port, settings.metrics_token)
    # hypercorn's parent kills the other workers as soon as one has exited, before their own
    # shutdown: a worker that stops first waits (at most this long) to see them out.
    linger = LINGER if server == "hypercorn" else 0.0
    _tidy(directory)
    for attempt in range(3):
        try:
            return SharedTarget(_private_directory(directory), worker, own, *address, linger)
        except FileNotFoundError:  # the last worker of a recycling round removed it meanwhile
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class SharedTarget(Publisher):
    """A pre-fork worker's part: publish its own file, or serve everyone's while it holds the
    port. ``server`` is the listener while this worker serves; ``port_error`` says why nobody
    could listen at the last try (the port is held by another program)."""

    def __init__(
        self,
        directory: str,
        worker: str,
        own: Any,
        addr: str,
        port: int,
        token: str | None,
        linger: float = 0.0,
    ) -> None:
        self.directory, self.worker, self.addr, self.port = directory, worker, addr, port
        self.linger = linger
        self.server: MetricsServer | None = None
        self.port_error: OSError | None = None
        self._serving_path = os.path.join(directory, SERVING)
        self._serving_fd: int | None = None
        self._ticks = 0
        self._stopped = False
        self._pid = os.getpid()
        served = CollectorRegistry(auto_describe=False)  # own series live + the others' files
        served.register(WorkersCollector(directory, local=own, exclude=file_stem(worker)))
        self._app = metrics_app(served, token)
        published = CollectorRegistry(auto_describe=False)
        published.register(own)
        super().__init__(directory, worker, lambda: generate_latest(published), start=False)
        try:
            self._try_serve()
        except BaseException:
            super().stop()
            raise
        self._thread.start()
        atexit.register(self._at_exit)  # a worker without lifespan (`--lifespan off`) too

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def served_by(self) -> str | None:
        """The id of the worker serving the target, as far as this worker knows."""
        if self.server is not None:
            return self.worker
        try:
            with open(self._serving_path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def port_taken_message(self) -> str:
        exc = self.port_error
        reason = exc.strerror if exc is not None and exc.strerror else str(exc)
        return (
            f"poolwatch: no /metrics listener: POOLWATCH_METRICS_PORT={self.port}: cannot listen "
            f"on {self.addr}:{self.port} ({reason}), and no worker of this server holds it: "
            "another program does. The app serves on; the workers publish meanwhile and take "
            "the port once it is free. Choose a free port, or set POOLWATCH_METRICS_PORT=0 to "
            "turn it off."
        )

    def _try_serve(self) -> None:
        fd = try_lock(self._serving_path)
        if fd is None:
            return  # another worker serves, or is trying to
        try:
            server = MetricsServer(self._app, self.addr, self.port)
        except OSError as exc:
            release_lock(fd, self._serving_path)
            self.port_error = exc
            return
        self.port_error = None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.worker.encode(), 0)
        self.server, self._serving_fd = server, fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # its series are served live from now on
        if self._thread.is_alive():  # a takeover, not the start-up (logged by the agent)
            logger.info(
                "poolwatch: this worker now serves /metrics", url=self.url, worker=self.worker
            )

    def publish(self) -> None:
        """Every second, on the publisher's thread."""
        self._ticks += 1
        if self.server is None:
            taken_before = self.port_error is not None
            self._try_serve()
            if self.port_error is not None and not taken_before:
                errors.degraded("exporter", self.port_taken_message())
        if self.server is None:
            super().publish()
        elif self._ticks % SWEEP_EVERY == 0:
            sweep(self.directory)  # files of workers killed without a goodbye (SIGKILL, OOM)

    def _at_exit(self) -> None:
        self.stop(at_exit=True)

    def stop(self, at_exit: bool = False) -> None:
        if self._stopped or os.getpid() != self._pid:  # a child forked by the app: not its files
            return
        self._stopped = True
        atexit.unregister(self._at_exit)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)  # at once, unless in the middle of a publish
        if self.server is not None and self._serving_fd is not None:
            self.server.stop()
            release_lock(self._serving_fd, self._serving_path)  # another worker takes over
        super().stop()  # own files and lock
        _remove_if_unused(self.directory)
        if not self.linger or not os.path.isdir(self.directory):
            return
        if at_exit:  # no new thread at interpreter exit; the process is leaving anyway
            self._see_out()
        else:
            # Not a daemon: the process waits for it on exit, and the server's parent process
            # waits for this process before it kills the other workers.
            threading.Thread(target=self._see_out, name="poolwatch-prefork-out").start()

    def _see_out(self) -> None:
        deadline = time.monotonic() + self.linger
        while os.path.isdir(self.directory) and time.monotonic() < deadline:
            time.sleep(0.05)
            _remove_if_unused(self.directory)
