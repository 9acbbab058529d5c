"""Errors raised by shoprec.

Every message names the offending value, what was expected and what to do,
so the person running a flow can act on it without reading the code.
"""

from __future__ import annotations


class ShoprecError(Exception):
    """Base class of every error raised on purpose by shoprec."""


class ConfigError(ShoprecError):
    """A parameter or setting is missing or invalid."""


class BatchRejectedError(ShoprecError):
    """A whole landing file was rejected; nothing of it was written."""

    def __init__(self, source_file: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.source_file = source_file
        self.reason = reason


class StoreError(ShoprecError):
    """The event store is missing, inconsistent or cannot be written."""


class VersioningError(ShoprecError):
    """A DVC command failed."""
