"""Source adapters: one landing file in, canonical events out."""

from __future__ import annotations

from shoprec.adapters.base import SourceBatch
from shoprec.adapters.generic import GenericAdapter, GenericSourceConfig
from shoprec.adapters.online_retail import OnlineRetailAdapter, OnlineRetailConfig

__all__ = [
    "GenericAdapter",
    "GenericSourceConfig",
    "OnlineRetailAdapter",
    "OnlineRetailConfig",
    "SourceBatch",
]
