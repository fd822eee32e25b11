"""The secrets the test suite plants, and one scan proving none of them reaches an output.

Tests take the passwords, URL credentials and tokens they plant from the constants below. The
pytest plugin ``tests/support/secret_scan.py`` (loaded by ``tests/conftest.py``) checks, for every
test, everything poolwatch could have written a secret into:

- the test's captured stdout, stderr and log records (in-process agents log there);
- the log files of the apps and ``poolwatch exporter`` processes the test started (the helpers in
  ``tests/support`` register them with :func:`watch_file`);
- every ``/metrics`` exposition the test read (``tests.support.net.Samples`` calls :func:`scan`),
  and any other output a test hands to :func:`scan` (CLI output, error bodies).

A planted secret found there fails the test at teardown, naming the secret and the output. Output
a test consumes itself (``capsys.readouterr()``, ``capture_output=True`` not handed to
:func:`scan`) and runs with ``-s`` are not seen: those tests assert on it themselves.
"""

from __future__ import annotations

import threading

DB_PASSWORD = "pw-Secr3t-4417"  # the test PostgreSQL's password, in every DSN the apps get
WRONG_DB_PASSWORD = "wr0ng-Pa55-9931"  # a DSN the server refuses
BAD_DSN_PASSWORD = "s3cr3t-dsn"  # in a DSN poolwatch cannot parse
URL_USER = "alice-7f3"  # basic auth in an upstream URL ...
URL_PASSWORD = "pw-Secr3t-91"
URL_TOKEN = "tok-abc-123"  # ... and a token in its query string
METRICS_TOKEN = "tok-Secr3t-9"  # POOLWATCH_METRICS_TOKEN
REDIS_PASSWORD = "rd-Secr3t-5521"  # the test redis-server's requirepass, in every redis URL
REDIS_USER = "rd-user-77"  # an ACL user in a redis URL (redis://user:password@...)
SQL_PARAMETER = "sql-Secr3t-5521"  # a value an app passes as a SQL parameter (diagnosis)


def with_credentials(url: str) -> str:
    """``url`` (``http://host:port/path?query``) with basic auth and a token planted in it."""
    credentials = f"{URL_USER}:{URL_PASSWORD}@"
    return url.replace("http://", f"http://{credentials}", 1) + f"&token={URL_TOKEN}"


PLANTED = {
    name: value
    for name, value in globals().items()
    if name.isupper() and isinstance(value, str) and name != "PLANTED"
}

_lock = threading.Lock()  # Samples are made on sampler threads too
_leaks: list[str] = []
_files: list[tuple[str, str]] = []


def find(text: str) -> list[str]:
    """The names of the planted secrets in ``text``, each with the line it is on (masked)."""
    found = []
    for name, secret in PLANTED.items():
        at = text.find(secret)
        if at >= 0:
            start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
            line = text[start : end if end >= 0 else len(text)].replace(secret, f"<{name}>")
            found.append(f"{name}: {line.strip()[:300]}")
    return found


def scan(text: str, where: str) -> None:
    """Record every planted secret in ``text`` (an output called ``where``)."""
    leaks = [f"{leak}  (in {where})" for leak in find(text)]
    if leaks:
        with _lock:
            _leaks.extend(leaks)


def watch_file(path: str, what: str) -> None:
    """Scan the file at ``path`` when the current test ends (a log a subprocess writes)."""
    with _lock:
        _files.append((path, what))


def drain() -> list[str]:
    """Every leak found since the last call (the watched files are read now)."""
    with _lock:
        files = list(_files)
        _files.clear()
    for path, what in files:
        try:
            with open(path, errors="replace") as f:
                scan(f.read(), f"{what} {path}")
        except FileNotFoundError:
            pass
    with _lock:
        leaks = list(_leaks)
        _leaks.clear()
    return leaks
