"""The secret seeds of draws (and of waiting rooms' shuffles): one per benefit and period,
made once and never replaced.

A seed is 32 random bytes, sealed at rest (AES-256-GCM under ``CLAIM_CODES_KEY``, see
``vault``); its SHA-256 (the commitment) is public from the moment it exists. The first seed
stored for a benefit and period wins (``INSERT … ON CONFLICT DO NOTHING``, then read back),
so every process draws with the same one whoever made it. Seeds are cached per process.
"""

from __future__ import annotations

import secrets

import asyncpg

from claim_service.domain.draws import commitment
from claim_service.errors import BackendUnavailable
from claim_service.store.vault import Vault, VaultError

SEED_BYTES = 32
CACHE_MAX = 10_000


# table -> the purpose sealed with each seed (a seed opens only where it was made for)
PURPOSES = {"draw_seeds": "drawseed", "room_seeds": "roomseed"}


def seed_context(benefit_id: str, period: str, table: str = "draw_seeds") -> str:
    return f"{PURPOSES[table]}:{benefit_id}/{period}"


class DrawSeeds:
    """Seeds kept in ``table``: ``draw_seeds`` (draws) or ``room_seeds`` (waiting rooms)."""

    def __init__(self, pool: asyncpg.Pool, codes_key: str, table: str = "draw_seeds") -> None:
        if table not in PURPOSES:
            raise ValueError(f"no seed table {table!r}")
        self.pool = pool
        self.vault = Vault(codes_key)
        self.table = table
        self._cache: dict[tuple[str, str], tuple[bytes, str]] = {}

    async def seed(self, benefit_id: str, period: str) -> bytes:
        """The period's seed, made now if there is none yet."""
        return (await self._get(benefit_id, period, create=True))[0]

    async def commitment(self, benefit_id: str, period: str, *, create: bool = True) -> str | None:
        """The published SHA-256 of the period's seed (None: no seed and ``create`` is off)."""
        found = await self._get(benefit_id, period, create=create)
        return found[1] if found[0] else None

    async def _get(self, benefit_id: str, period: str, *, create: bool) -> tuple[bytes, str]:
        key = (benefit_id, period)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        context = seed_context(benefit_id, period, self.table)
        try:
            row = await self.pool.fetchrow(
                f"SELECT sealed, commitment FROM {self.table}"
                " WHERE benefit_id = $1 AND period = $2",
                benefit_id,
                period,
            )
            if row is None and not create:
                return b"", ""
            if row is None:
                fresh = secrets.token_bytes(SEED_BYTES)
                row = await self.pool.fetchrow(
                    f"""WITH made AS (
                           INSERT INTO {self.table} (benefit_id, period, sealed, commitment)
                           VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING
                           RETURNING sealed, commitment)
                       SELECT sealed, commitment FROM made
                       UNION ALL
                       SELECT sealed, commitment FROM {self.table}
                       WHERE benefit_id = $1 AND period = $2""",
                    benefit_id,
                    period,
                    self.vault.seal(fresh.hex(), context),
                    commitment(fresh),
                )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise BackendUnavailable("PostgreSQL is unavailable") from exc
        if row is None:  # made by another process between the two statements' snapshots
            return await self._get(benefit_id, period, create=create)
        try:
            seed = bytes.fromhex(self.vault.open(row["sealed"], context))
        except VaultError as exc:
            raise BackendUnavailable(
                f"the seed in {self.table} cannot be opened with this CLAIM_CODES_KEY"
            ) from exc
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (seed, row["commitment"])
        return seed, row["commitment"]
