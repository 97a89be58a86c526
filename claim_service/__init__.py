"""claim-service: flash benefit claims decided atomically in Redis, persisted to PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
