"""The OSS error tree: one base error, one subclass per failure.

Each error's docstring is its message; structured fields ride along so the API
boundary (oss.server) can map the type to an HTTP status and a JSON body.
"""

from __future__ import annotations

from typing import Any


class OssError(Exception):
    """OSS error."""

    code = "oss_error"

    def __init__(self, detail: str | None = None, **fields: Any) -> None:
        self.detail = detail
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The human message: the class docstring plus the detail."""
        base = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        return f"{base}: {self.detail}" if self.detail else base


class InvalidRequest(OssError):
    """Invalid request."""

    code = "invalid_request"


class Unauthorized(OssError):
    """Missing or invalid bearer token."""

    code = "unauthorized"


class Forbidden(OssError):
    """This token may not perform this operation."""

    code = "forbidden"


class NotFound(OssError):
    """No such object."""

    code = "not_found"


class Conflict(OssError):
    """The object is in a state that does not allow this operation."""

    code = "conflict"


class LimitExceeded(OssError):
    """A resource limit would be exceeded."""

    code = "limit_exceeded"

    def __init__(self, level: str, resource: str, limit: int, requested: int) -> None:
        super().__init__(
            f"{level} {resource} limit is {limit}, this would make it {requested}",
            level=level,
            resource=resource,
            limit=limit,
            requested=requested,
        )


class BudgetExhausted(OssError):
    """The budget is exhausted: no further scale-up."""

    code = "budget_exhausted"


class NoCapacity(OssError):
    """No instance satisfies the resource selection policy right now."""

    code = "no_capacity"


class ProviderError(OssError):
    """An instance provider failed."""

    code = "provider_error"


class StoreError(OssError):
    """The state store failed."""

    code = "store_error"


class LeaseError(OssError):
    """The lease is not held (expired, or held by someone else)."""

    code = "lease_error"


class ValidationFailed(InvalidRequest):
    """The request does not match the schema."""

    code = "validation_failed"


class PayloadTooLarge(InvalidRequest):
    """The request body is too large."""

    code = "payload_too_large"


class UnsafeDataDir(StoreError):
    """Refusing a data directory others could read (it holds tokens and exec keys)"""

    code = "unsafe_data_dir"


class RequestTimeout(OssError):
    """The request was not received in time"""

    code = "request_timeout"


class MigrationFailed(Conflict):
    """Migration failed (the program runs on where it was)."""

    code = "migration_failed"
