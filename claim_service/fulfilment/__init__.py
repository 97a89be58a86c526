"""Delivering persisted claims: the worker, partner orders and their outcomes, card-key
pools, compensation, request signing and encryption at rest.

May import: ``store``, ``domain``, ``config``, ``errors``, ``metrics`` (and aiohttp's client).
Never ``claims`` (it reads persisted claims from PostgreSQL) and never aiohttp's server side.
"""
