"""A real, throwaway PostgreSQL server for tests: initdb in a temporary directory, loopback
port, stopped and deleted afterwards.

PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to the `postgres` user
that Debian's package creates; otherwise to whoever runs the tests. The binaries come from
PATH or Debian's /usr/lib/postgresql/N/bin. `.ci/deps` installs them when missing. A server that
cannot be started fails the tests that need it: it never skips them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import free_port

SUPERUSER = "postgres"
# A role that must log in with a password (scram-sha-256), for the password-source tests.
PASSWORD_USER = "pwuser"
PASSWORD = "s3cret-pw"
START_TIMEOUT_S = 60


def bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name))
    if versions:
        return Path(versions[-1]).parent
    raise RuntimeError("PostgreSQL server binaries not found (pg_ctl); run .ci/deps "
                       "(apt-get install postgresql) to install them")


class PgServer:
    """One cluster. `fsync` off by default: tests check semantics, not the disk."""

    def __init__(self, *, fsync: bool = False, extra_conf: str = "") -> None:
        self.bin = bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="collector-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = SUPERUSER
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--no-sync", "--encoding=UTF8", "--locale=C")
        settings = {"port": str(self.port), "listen_addresses": "'127.0.0.1'",
                    "unix_socket_directories": f"'{self.root}'", "fsync": "on" if fsync
                    else "off", "full_page_writes": "on" if fsync else "off",
                    "max_connections": "100"}
        with (self.data / "postgresql.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
            conf.write(extra_conf)
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n")
        self._databases = 0
        self.start()
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([str(self.bin / program), *args], user=self._user,
                                capture_output=True, text=True, cwd=self.root,
                                timeout=START_TIMEOUT_S, check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr}\n{log}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT_S), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w",
                  "-t", str(START_TIMEOUT_S), "restart")

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(dbname), autocommit=True)

    def new_database(self, *, encoding: str | None = None) -> str:
        """A fresh empty database; its URL. `encoding` (e.g. "SQL_ASCII", what a cluster made
        by `initdb --locale=C` without -E gets) instead of the cluster's UTF8."""
        self._databases += 1
        name = f"t{self._databases}"
        with self.admin() as conn:
            if encoding is None:
                conn.execute(f"CREATE DATABASE {name}")
            else:  # template0: template1's encoding is fixed; C locale goes with any encoding
                conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING "
                             f"'{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'")
            conn.execute(f"GRANT ALL ON DATABASE {name} TO {PASSWORD_USER}")
        with self.admin(name) as conn:
            conn.execute(f"GRANT ALL ON SCHEMA public TO {PASSWORD_USER}")
        return self.url(name)

    def query(self, url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, url: str, sql: str, params: Any = ()) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql, params)

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
