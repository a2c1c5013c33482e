"""A real PostgreSQL 15 cluster for the tests (Debian's `postgresql`): `initdb` and `pg_ctl` in a
temporary directory, listening on 127.0.0.1 at a free port and on no unix socket, password
(SCRAM) authentication only. initdb refuses to run as root: as root, the cluster belongs to
`nobody`, in a directory of its own under /tmp (pytest's temporary directories are root's, 0700).

The session fixture `postgres` starts one cluster for the whole run and removes it at the end;
each test takes a database of its own (`Postgres.database()`): a role with a password and a
database it owns, what the README asks an operator to create."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.procs import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
RUN_AS = "nobody"  # when the tests run as root


@dataclass(frozen=True, slots=True)
class Database:
    """A role and the database it owns; `password_file` holds the role's password (0600)."""

    host: str
    port: int
    dbname: str
    user: str
    password: str
    password_file: Path

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The origin's `audit.postgresql` section for this database."""
        return {"host": self.host, "port": self.port, "dbname": self.dbname, "user": self.user,
                "password": {"file": str(self.password_file)}, "sslmode": "disable", **extra}

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(host=self.host, port=self.port, dbname=self.dbname, user=self.user,
                               password=self.password, sslmode="disable", connect_timeout=5, **kwargs)


class Postgres:
    def __init__(self, root: Path, secrets_dir: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.secrets_dir = secrets_dir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self._count = 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        as_user = ["runuser", "-u", RUN_AS, "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root,
                                check=False)
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def init(self) -> None:
        pwfile = self.root / "superuser.password"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=reject", "-E", "UTF8", "--locale=C.UTF-8")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '{self.host}'\nport = {self.port}\nunix_socket_directories = ''\n"
                       "fsync = on\nmax_connections = 100\nshared_buffers = 32MB\n")

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: like a crash (no checkpoint, clients cut off); `fast`: clients cut off,
        clean shutdown."""
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        try:
            with self.connect(connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(host=self.host, port=self.port, dbname=dbname, user=SUPERUSER,
                               password=self.password, sslmode="disable", autocommit=True, **kwargs)

    def database(self) -> Database:
        """A new role (password auth) and a database it owns."""
        self._count += 1
        name = f"shoal{self._count}_{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(24)
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                           sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
        password_file = self.secrets_dir / f"{name}.password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        return Database(self.host, self.port, name, name, password, password_file)


@contextlib.contextmanager
def running_postgres(secrets_dir: Path) -> Iterator[Postgres]:
    if not (BIN / "initdb").exists():
        pytest.fail(f"{BIN / 'initdb'} is missing: scripts/install-debian-packages installs postgresql")
    root = Path(tempfile.mkdtemp(prefix="shoal-pg-", dir="/tmp"))
    pg = Postgres(root, secrets_dir)
    try:
        pg._chown(root)
        pg.init()
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if (pg.data / "postmaster.pid").exists():
                pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    with running_postgres(tmp_path_factory.mktemp("pg-secrets")) as pg:
        yield pg


@pytest.fixture
def pg_database(postgres: Postgres) -> Iterator[Database]:
    """A database of the test's own; a cluster stopped by the test is started again after it."""
    db = postgres.database()
    yield db
    if not (postgres.data / "postmaster.pid").exists():
        postgres.start()  # (-w: returns once it accepts connections)
