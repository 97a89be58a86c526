"""Pure rules of the programme: benefits and their releases, periods, claim states.

No I/O: no Redis, no PostgreSQL, no HTTP. May import: ``claim_service.errors`` only.
"""
