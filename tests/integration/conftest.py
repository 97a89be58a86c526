"""Fixtures of the integration tests beyond the suite's (``tests/conftest.py``)."""

from tests.integration.campaign_kit import bank

__all__ = ["bank"]
