"""The SQL tables of a medloupe home: SQLite files under ``Settings.home`` (the embedded
default), or one PostgreSQL database shared by every replica (``Settings.database_url``).

A :class:`Table` is written once, in SQL both engines take: ``?`` placeholders (turned into
``%s`` for psycopg), ``{t}`` for the table's name, ``DOUBLE PRECISION`` for UNIX times.
Statements that only one engine has (a claim with ``FOR UPDATE SKIP LOCKED``) are chosen
by :attr:`Table.postgres`. Every operation takes its own connection (SQLite: opened in WAL
mode with a 30 s busy timeout and closed after; PostgreSQL: from the process's pool, in
autocommit), so a table object may be shared by threads and processes. The schema is
created, and new columns added, when a table is first opened (in PostgreSQL once per
process, under an advisory lock, so replicas starting together do not race); a database
URL's password never appears in a message.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from medloupe.config import Settings, env_name
from medloupe.errors import MedloupeError

try:  # the `postgres` extra
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout

    HAS_PSYCOPG = True
except ImportError:  # pragma: no cover - SQLite needs none of it
    HAS_PSYCOPG = False

#: what psycopg raises (the database down, a dropped connection, a refused statement)
POSTGRES_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error,) if HAS_PSYCOPG else ()
#: what either engine raises
SQL_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, *POSTGRES_ERRORS)

_POSTGRES_SCHEMES = ("postgresql", "postgres")
POOL_SIZE = 8  # connections per process (threads of the HTTP server and the run manager)
POOL_TIMEOUT_S = 15.0


class DatabaseError(MedloupeError):
    """The shared database cannot be reached or refused a statement."""


def is_postgres(url: str | None) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return bool(url) and urlsplit(str(url)).scheme in _POSTGRES_SCHEMES


def uses_database(settings: Settings | None) -> bool:
    """Whether ``settings`` put runs' traces and reviews in the shared database."""
    return settings is not None and settings.database_url is not None


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_database_url(url: str) -> str:
    """``url`` when medloupe can use it.

    Raises:
        DatabaseError: not a ``postgresql://`` URL, or psycopg is not installed.
    """
    if not is_postgres(url):
        raise DatabaseError(
            f"{env_name('database_url')}={safe_url(url)!r} is not a PostgreSQL URL; "
            "use postgresql://USER:PASSWORD@HOST:PORT/DBNAME, or unset it for SQLite"
        )
    if not HAS_PSYCOPG:
        raise DatabaseError(
            f"{env_name('database_url')} names PostgreSQL but psycopg is not installed; "
            "pip install 'medloupe[postgres]'"
        )
    return url


def connect_postgres(url: str) -> Any:
    """A psycopg connection in autocommit (the caller closes it).

    Raises:
        DatabaseError: the server cannot be reached or refuses (the message names the fix).
    """
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot reach the database {safe_url(url)} ({first_line(exc)}); start "
            f"PostgreSQL or correct {env_name('database_url')}"
        ) from None


class Table:
    """One table of a home: ``<home>/<SQLITE_FILE>`` or ``PG_NAME`` in the shared database.

    Subclasses set ``SCHEMA`` (``CREATE TABLE IF NOT EXISTS {t} (...)``), the file and table
    names, and ``COLUMNS_ADDED`` (``(name, type)`` of columns later versions added; an older
    table gains them when opened).
    """

    SCHEMA: ClassVar[str] = ""
    SQLITE_FILE: ClassVar[str] = ""
    SQLITE_NAME: ClassVar[str] = ""
    PG_NAME: ClassVar[str] = ""
    COLUMNS_ADDED: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, settings: Settings) -> None:
        self.url = settings.database_url
        self.postgres = self.url is not None
        if self.url is not None:
            check_database_url(self.url)
            self.name = self.PG_NAME
            self.path: Path | None = None
        else:
            self.name = self.SQLITE_NAME
            self.path = settings.home / self.SQLITE_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @property
    def where(self) -> str:
        """Where the table lives, for messages (no password)."""
        return safe_url(self.url) if self.url else str(self.path)

    # -- connections --------------------------------------------------------------------

    def open(self) -> Any:
        """A new connection to the table's database (the caller closes it): psycopg in
        autocommit, or SQLite in WAL mode with a 30 s busy timeout usable from any thread.

        Raises:
            DatabaseError: PostgreSQL cannot be reached (the message names the fix).
        """
        if self.url is not None:
            return connect_postgres(self.url)
        assert self.path is not None
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        if self.url is not None:  # a pooled connection: no new TLS/SCRAM handshake each time
            try:
                with _pool(self.url).connection() as conn:
                    yield conn
            except PoolTimeout:
                raise DatabaseError(
                    f"no connection to the database {self.where} within {POOL_TIMEOUT_S:g} s; "
                    f"check that PostgreSQL is up and {env_name('database_url')}"
                ) from None
            return
        conn = self.open()
        try:
            yield conn
        finally:
            conn.close()

    def sql(self, sql: str) -> str:
        """``sql`` for this table's engine (``{t}`` named, ``?`` as psycopg wants)."""
        sql = sql.replace("{t}", self.name)
        return sql.replace("?", "%s") if self.postgres else sql

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """The rows of one statement, as dicts."""
        with self._connect() as conn:
            cur = self._execute(conn, sql, params)
            if cur.description is None:
                return []
            names = [d[0] for d in cur.description]
            out = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            if not self.postgres:
                conn.commit()  # an UPDATE ... RETURNING
            return out

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Execute one statement; the number of rows it changed."""
        with self._connect() as conn:
            cur = self._execute(conn, sql, params)
            if not self.postgres:
                conn.commit()
            return int(cur.rowcount)

    def _execute(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Any:
        try:
            return conn.execute(self.sql(sql), params)
        except SQL_ERRORS as exc:
            raise DatabaseError(f"{self.where}: {first_line(exc)}") from None

    # -- schema -------------------------------------------------------------------------

    def _migrate(self) -> None:
        if self.url is not None:
            _migrate_postgres(self.url, self.name, self.sql(self.SCHEMA), self.COLUMNS_ADDED)
            return
        with self._connect() as conn:
            conn.execute(self.sql(self.SCHEMA))
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({self.name})")}
            for column, kind in self.COLUMNS_ADDED:
                if column not in have:
                    conn.execute(f"ALTER TABLE {self.name} ADD COLUMN {column} {kind}")
            conn.commit()


@functools.cache  # one pool per process and database, opened on first use
def _pool(url: str) -> Any:
    return ConnectionPool(
        url,
        min_size=1,
        max_size=POOL_SIZE,
        kwargs={"autocommit": True, "connect_timeout": 10},
        check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
        timeout=POOL_TIMEOUT_S,
        open=True,
        name="medloupe",
    )


@functools.cache  # once per process and table: the schema only grows
def _migrate_postgres(
    url: str, name: str, schema: str, columns: tuple[tuple[str, str], ...]
) -> None:
    conn = connect_postgres(url)
    with conn, conn.transaction():
        # replicas starting at once: one creates, the others then see it
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
        conn.execute(schema)
        have = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                (name,),
            )
        }
        for column, kind in columns:
            if column not in have:
                conn.execute(f"ALTER TABLE {name} ADD COLUMN {column} {kind}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (passwords masked), or its type's name."""
    text = str(exc).strip().splitlines()
    return re.sub(r"password=\S+", "password=***", text[0]) if text else type(exc).__name__
