"""A real Redis server for tests: Debian's ``redis-server`` on a free loopback port, with a
password, no persistence; stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from . import planted
from .apps import stop_process
from .net import free_port, wait_for_port

PASSWORD = planted.REDIS_PASSWORD  # tests assert it never shows up in output


@dataclass
class Redis:
    proc: subprocess.Popen
    port: int
    root: str
    host: str = "127.0.0.1"

    def url(self, db: int = 0, user: bool = False) -> str:
        """``redis://[user]:password@127.0.0.1:port/db``; ``user``: as an ACL user."""
        name = planted.REDIS_USER if user else ""
        return f"redis://{name}:{PASSWORD}@{self.host}:{self.port}/{db}"


def start_redis() -> Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server")
    root = tempfile.mkdtemp(prefix="poolwatch-redis-")
    port = free_port()
    log = open(f"{root}/server.log", "w")  # noqa: SIM115 - the server's, closed with it
    # an ACL user with the same password: URLs with a user name work too
    acl = f"user {planted.REDIS_USER} on >{PASSWORD} ~* &* +@all"
    with open(f"{root}/users.acl", "w") as f:
        f.write(f"user default on >{PASSWORD} ~* &* +@all\n{acl}\n")
    proc = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--aclfile", f"{root}/users.acl",
            "--save", "",
            "--appendonly", "no",
            "--dir", root,
            "--maxclients", "1000",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        stop_process(proc)
        raise
    return Redis(proc, port, root)


def remove(server: Redis) -> None:
    stop_process(server.proc)
    shutil.rmtree(server.root, ignore_errors=True)
