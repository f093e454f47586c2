"""A real PostgreSQL server for the tests: Debian's package, a fresh cluster in a temporary
folder, on a loopback port, with a password (so URLs carry one, as in deployments).

``initdb`` refuses to run as root: when the tests run as root, the cluster belongs to the
``postgres`` user and its commands run through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.service_helpers import Server, free_port


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class Postgres:
    """``initdb`` + ``pg_ctl start`` on 127.0.0.1:<free port>; :meth:`create_database`
    gives each test its own database."""

    user = "medloupe"

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (apt-get install postgresql)")
        self.bin = bindir
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="medloupe-pg-"))
        self.data = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _cmd(self, *args: str) -> list[str]:
        if not self.as_postgres:
            return list(args)
        # runuser lives in sbin, which a minimal PATH (env -i, cron) leaves out
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        runuser = shutil.which("runuser", path=path) or "runuser"
        return [runuser, "-u", "postgres", "--", *args]

    def start(self) -> Postgres:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(
            self._cmd(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync",
            ),
            check=True, capture_output=True, timeout=120,
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c max_connections=200"
        )
        subprocess.run(
            self._cmd(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                "-o", opts, "-w", "-t", "60", "start",
            ),
            check=True, capture_output=True, timeout=90,
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
            capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + 10
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_owning(url: str, server: Server, timeout_s: float = 300) -> list[str]:
    """The ids of the runs the ``medloupe serve`` replica ``server`` holds, once it holds
    one (it is then worth killing)."""
    import psycopg

    assert server.proc is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT run_id FROM medloupe_service_runs WHERE status='running' "
                "AND owner LIKE %s",
                (f"%:{server.proc.pid}:%",),
            ).fetchall()
        if rows:
            return [r[0] for r in rows]
        time.sleep(0.1)
    raise AssertionError("the replica never claimed a run")
