"""Where state lives: every Redis key and Lua script, the Redis and PostgreSQL connections,
migrations, the catalogue and tier snapshots in both stores, claim state transitions,
anomalies, and recovery (rebuilding Redis's counters from PostgreSQL).

May import: ``domain``, ``config``, ``errors``, ``metrics``. Never HTTP.
"""
