"""Schema migrations: ``migrations/NNNN_name.sql``, each applied once, in order, in its own
transaction, under an advisory lock (tracked in ``schema_migrations``)."""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg

from claim_service.errors import MigrationError
from claim_service.store.keyspace import migrations_dir

log = logging.getLogger(__name__)

MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
MIGRATION_LOCK = 0x636C61696D  # advisory lock id: one migrator at a time


def list_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``migrations/NNNN_name.sql``, in order."""
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = MIGRATION_RE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path.read_text()))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migrations share a number")
    return found


async def migrate(conn: Any) -> list[str]:
    """Apply pending migrations, each once and in its own transaction. Returns names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in list_migrations():
            if version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {version:04d}_{name} failed: {exc}") from exc
            log.info("applied migration %04d_%s", version, name)
            applied.append(f"{version:04d}_{name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied
