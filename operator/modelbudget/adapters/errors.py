"""The one family of errors every adapter raises: callers see domain outcomes, never a client
library's exceptions, and every message is safe to show in status and Events (no credentials,
no response bodies)."""

from __future__ import annotations


class AdapterError(Exception):
    """An outside system did not do what was asked."""


class NotFound(AdapterError):
    """The object (or the kind: its CRD is not installed) does not exist."""


class Conflict(AdapterError):
    """Someone else changed or created the object first; read again and retry."""


class Rejected(AdapterError):
    """The request was refused (forbidden, invalid): retrying unchanged will not help."""


class Unavailable(AdapterError):
    """The system could not be reached, timed out or failed (5xx): the next tick retries."""
