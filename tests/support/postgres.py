"""A real PostgreSQL server for tests: initdb in a temp dir, started on a free loopback port.

Runs the server as the ``postgres`` user when the tests run as root (pg_ctl refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from . import planted
from .net import free_port

PASSWORD = planted.DB_PASSWORD  # tests assert it never shows up in output


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (see .ci/run)")
    return os.path.dirname(found[-1])


@dataclass
class Postgres:
    bindir: str
    root: str
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"
    database: str = "app"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)

    def dsn(
        self, scheme: str = "postgresql", password: bool = True, database: str | None = None
    ) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"{scheme}://{self.user}{secret}@{self.host}:{self.port}/{database or self.database}"

    def start(self) -> None:
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            f"{self.root}/data",
            "-l",
            f"{self.root}/server.log",
            "-w",
            "-t",
            "30",
            "-o",
            f"-c listen_addresses={self.host} -p {self.port} -k {self.root}/sock -c fsync=off "
            "-c max_connections=200",
            "start",
        )

    def stop(self) -> None:
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            f"{self.root}/data",
            "-m",
            "fast",
            "-w",
            "stop",
            check=False,
        )

    def restart(self) -> None:
        # -l: the restarted server must not inherit (and hold open) our captured stdout
        self._run(
            f"{self.bindir}/pg_ctl",
            "-D",
            f"{self.root}/data",
            "-l",
            f"{self.root}/server.log",
            "-m",
            "fast",
            "-w",
            "restart",
        )


def start_postgres() -> Postgres:
    root = tempfile.mkdtemp(prefix="poolwatch-pg-")
    os.chmod(root, 0o755)
    os.makedirs(f"{root}/sock")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(f"{root}/sock", "postgres", "postgres")
    pg = Postgres(_bindir(), root, free_port())
    pg._run(
        f"{pg.bindir}/initdb",
        "-D",
        f"{root}/data",
        "-U",
        "postgres",
        "-A",
        "trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    )
    with open(f"{root}/data/pg_hba.conf", "w") as hba:  # password auth on TCP, like production
        hba.write("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    pg.start()
    pg._run(
        f"{pg.bindir}/psql",
        "-h",
        f"{root}/sock",
        "-p",
        str(pg.port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        f"ALTER USER postgres PASSWORD '{PASSWORD}'",
        "-c",
        "CREATE DATABASE app",
    )
    return pg


def remove(pg: Postgres) -> None:
    pg.stop()
    shutil.rmtree(pg.root, ignore_errors=True)
