"""A claim from decision to record: the engine batching claims into ``claim.lua``, the writer
moving accepted claims from the stream into PostgreSQL, and reading claims back.

May import: ``store``, ``domain``, ``config``, ``errors``, ``metrics``. Never HTTP.
"""
