"""The coordinator's database connection: one engine, sessions that commit or roll back whole."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.at_rest import BlobCipher
from fleetlora.coordinator.models import Base

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema create_all made before migrations existed


class Database:
    """A SQLAlchemy engine for ``url`` (``sqlite:///FILE`` by default, PostgreSQL by URL)."""

    def __init__(
        self, url: str, cipher: BlobCipher | None = None, *, create: bool = True, reader: bool = False
    ) -> None:
        """``cipher``: how blobs are sealed at rest; by default from this process's environment.
        ``create=False``: refuse a database that does not exist yet rather than make it (read commands:
        a mistyped URL must not leave an empty database behind). ``reader``: this process only reads
        (the console, metrics, ``status``), so on SQLite its transactions never take the write lock
        and cannot hold up a round's writes."""
        self.cipher = cipher if cipher is not None else BlobCipher.from_environment()
        self.url = url
        self.create = create
        try:
            parsed = make_url(url)
            if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
                if not create and not Path(parsed.database).is_file():
                    raise _missing(url, "no such file")
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(parsed)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise ConfigError(
                f"Cannot use database URL {without_password(url)!r}: {exc}. Use sqlite:///FILE or "
                "postgresql+psycopg://USER@HOST/DB."
            ) from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_deferred if reader else _sqlite_begin_immediate)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._initialized = False
        self.revision: str | None = None  # the schema's, once initialized

    def initialize(self) -> Database:
        """Bring the schema to the newest migration (idempotent); must run before :meth:`session`.

        A server that cannot be reached, or a database it does not have, is a :class:`ConfigError`
        naming the URL; so is, with ``create=False``, a database without fleetlora's tables.
        """
        try:
            with self.engine.connect() as connection:
                tables = inspect(connection).get_table_names()
        except OperationalError as exc:
            raise _unreachable(self.url, exc) from None
        if not self.create and "alembic_version" not in tables and "model_versions" not in tables:
            raise _missing(self.url, "it holds no fleetlora tables")
        self.revision = upgrade(self.engine)
        self._initialized = True
        return self

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        if not self._initialized:
            raise RuntimeError("Database.initialize() was not called.")
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()


def _missing(url: str, why: str) -> ConfigError:
    return ConfigError(
        f"No fleetlora database at {without_password(url)} ({why}): pass --db URL or --config FILE, "
        "or make it with `fleetlora coordinator db upgrade --db URL` (`coordinator up` does too)."
    )


def _unreachable(url: str, exc: OperationalError) -> ConfigError:
    """The driver's own first line (server down, database or role missing, wrong password)."""
    reason = " ".join(str(exc.orig or exc).split("\n")[0].split())
    return ConfigError(
        f"Cannot open the database {without_password(url)}: {reason}. Check --db/--config, that the "
        "server runs and the database exists (createdb NAME), then `fleetlora coordinator db upgrade`."
    )


def without_password(url: str) -> str:
    """``url`` as it may be shown or written (terminal, results.json): any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url if "@" not in url else "<a database URL that does not parse>"


def upgrade(engine: Engine) -> str:
    """Run Alembic's migrations up to the newest; return the revision the database is now at.

    A database made before migrations existed (tables but no ``alembic_version``) is adopted: any
    table it lacks is created, and it is stamped as the baseline before upgrading.
    """
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        tables = inspect(connection).get_table_names()
        if "model_versions" in tables and "alembic_version" not in tables:
            Base.metadata.create_all(connection)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
        return str(MigrationContext.configure(connection).get_current_revision())


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    connection.isolation_level = None  # the driver's own deferred BEGIN off: _sqlite_begin_immediate's
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # a killed coordinator never leaves a torn write
    cursor.close()


def _sqlite_begin_immediate(connection: Connection) -> None:
    """Take SQLite's write lock when a transaction begins, not at its first write.

    With a deferred BEGIN, two processes can both read the audit head, then the second to write is
    refused ("database is locked") and its whole change, a round's version included, rolls back; SQLite
    ignores ``SELECT ... FOR UPDATE``. An immediate BEGIN makes the second wait its turn (the driver's
    5 s busy timeout), as PostgreSQL's row lock does (SQLAlchemy's documented pysqlite recipe).
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(connection: Connection) -> None:
    """A reader's BEGIN: under WAL it reads a snapshot and never blocks, nor is blocked by, a writer."""
    connection.exec_driver_sql("BEGIN")
