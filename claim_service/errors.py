"""One root exception; driver errors are wrapped with ``__cause__`` kept."""

from __future__ import annotations


class ClaimServiceError(Exception):
    """Root of every error raised on purpose by claim-service."""


class ConfigError(ClaimServiceError):
    """Settings or a benefit definition are invalid."""


class ValidationError(ClaimServiceError):
    """Input from a client or an operator does not have the expected shape."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(ClaimServiceError):
    """A benefit, option or claim does not exist."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BackendUnavailable(ClaimServiceError):
    """Redis or PostgreSQL cannot be reached or answered with an error."""


class EmbeddedServerError(ClaimServiceError):
    """A local Valkey or PostgreSQL process could not be started or stopped."""


class MigrationError(ClaimServiceError):
    """A schema migration failed to apply."""


class ConflictError(ClaimServiceError):
    """The request conflicts with the resource's current state (HTTP 409)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
