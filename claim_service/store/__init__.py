"""Where state lives: every Redis key and Lua script, the Redis and PostgreSQL connections,
migrations, the catalogue and tier snapshots in both stores, claim state transitions,
anomalies, recovery (rebuilding Redis's counters from PostgreSQL) and reconciliation
(reporting where they drift).

May import: ``domain``, ``config``, ``errors``, ``metrics``. Never HTTP.
"""
