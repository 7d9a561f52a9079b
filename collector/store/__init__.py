"""Storage: the interface the pipeline and readers see (base) and its backends.

`open_store` and `open_reader` choose the backend from the config; nothing above this package
names one. The postgres backend is imported only when configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from collector.store.base import Reader, Store
from collector.store.budgets import Outbox

if TYPE_CHECKING:
    from collector.config import Config, PostgresConfig
    from collector.store.postgres import ConnectOptions


def open_store(config: Config) -> Store:
    """The configured writer, not yet opened (`await store.open()`)."""
    if config.storage_backend == "postgres":
        from collector.store.postgres import PostgresStore

        assert config.postgres is not None
        return PostgresStore(connect_options(config.postgres),
                             retention_s=config.dedupe_retention_s,
                             commit_timeout_s=config.postgres.commit_timeout_s,
                             resolve_window_s=config.resolve_window_s,
                             budgets=config.budgets, sinks=config.alert_sinks)
    from collector.store.sqlite import SQLiteStore

    return SQLiteStore(config.sqlite_path, retention_s=config.dedupe_retention_s,
                       resolve_window_s=config.resolve_window_s,
                       budgets=config.budgets, sinks=config.alert_sinks)


def open_outbox(config: Config) -> Outbox:
    """The alert outbox of the configured database, for the delivery task (its own
    connection, opened on first use)."""
    if config.storage_backend == "postgres":
        from collector.store.postgres import open_outbox as open_pg_outbox

        assert config.postgres is not None
        return open_pg_outbox(connect_options(config.postgres))
    from collector.store.sqlite import open_outbox as open_sqlite_outbox

    return open_sqlite_outbox(config.sqlite_path)


def open_reader(config: Config) -> Reader:
    if config.storage_backend == "postgres":
        from collector.store.postgres import PostgresReader

        assert config.postgres is not None
        return PostgresReader(connect_options(config.postgres))
    from collector.store.sqlite import SQLiteReader

    return SQLiteReader(config.sqlite_path)


def web_source(config: Config) -> Path | ConnectOptions:
    """What the fleet view opens its own read-only connection to: the SQLite file, or the
    PostgreSQL server (collector.web.app.Reader)."""
    if config.storage_backend == "postgres":
        assert config.postgres is not None
        return connect_options(config.postgres)
    return config.sqlite_path


def connect_options(pg: PostgresConfig) -> ConnectOptions:
    from collector.store.postgres import ConnectOptions

    return ConnectOptions(url=pg.url, password=pg.password,
                          connect_timeout_s=pg.connect_timeout_s)
