"""Benchmarks for claim-service.

Each benchmark measures its baselines in the same run (a Redis PING, a trivial HTTP GET)
and writes a Markdown report under ``bench/results/``; they are not timed unit tests.
Run them with ``./run bench <name>`` (``python -m bench <name>``):

``claim-path``
    the cost of one claim alone, claims coalesced into batches, JWT verification and the
    whole HTTP path, against the embedded Valkey and PostgreSQL (see ``bench.claim_path``).

``bench/locustfile.py`` is a locust scenario for load tests against a running
``claim-service serve``.
"""
