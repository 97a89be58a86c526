"""The HTTP edge: the member listener (claims, catalogue, partner callbacks) and the ops
listener (admin API, metrics), their server hardening, authentication and error bodies.
The only package serving HTTP (aiohttp.web).

May import: ``claims``, ``fulfilment``, ``store``, ``domain``, ``config``, ``errors``,
``metrics``. Never ``local``.
"""
