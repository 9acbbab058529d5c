"""Keyed pseudonyms for customer ids (HMAC-SHA256).

The same key is used at ingestion and by the service, so a shop's own id maps
to the same pseudonym everywhere and no raw id is ever written.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from shoprec.exceptions import ConfigError

logger = logging.getLogger(__name__)

# Hex characters kept from the HMAC digest: 64 bits, so collisions among a
# shop's customers are negligible (about 1 in 10^10 for a million users).
PSEUDONYM_HEX_CHARS = 16
MIN_KEY_BYTES = 16
# Digested with the key to tell which key a model was trained under, without storing the key.
KEY_CHECK_INPUT = "shoprec:key-check"


def load_or_create_key(key: str | None, key_file: Path) -> bytes:
    """Return the pseudonymization key from `key`, else from `key_file`.

    When neither contains a key, a random one is written to `key_file` (mode 0600)
    with a warning: it must be kept, because losing it changes every pseudonym.
    """
    if key:
        raw = key.encode("utf-8")
        if len(raw) < MIN_KEY_BYTES:
            raise ConfigError(
                f"SHOPREC_PSEUDONYM_KEY is {len(raw)} bytes long; expected at least "
                f"{MIN_KEY_BYTES}. Generate one with: python -c 'import secrets; "
                "print(secrets.token_hex(32))'"
            )
        return raw

    if key_file.exists():
        stored = key_file.read_text(encoding="utf-8").strip()
        if len(stored) < MIN_KEY_BYTES:
            raise ConfigError(
                f"key file {key_file} contains {len(stored)} characters; expected at least "
                f"{MIN_KEY_BYTES}. Delete it to generate a new key (this changes every pseudonym)."
            )
        return stored.encode("utf-8")

    key_file.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_hex(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(generated + "\n")
    logger.warning(
        "No SHOPREC_PSEUDONYM_KEY set: generated a new key in %s. Keep this file (or set "
        "SHOPREC_PSEUDONYM_KEY) because a new key changes every pseudonym.",
        key_file,
    )
    return generated.encode("utf-8")


class Pseudonymizer:
    """Map raw identifiers to keyed, stable pseudonyms."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"pseudonymization key is {len(key)} bytes; expected >= 16")
        self._key = key
        self._cache: dict[str, str] = {}

    def digest(self, value: str, length: int = PSEUDONYM_HEX_CHARS) -> str:
        """Return the first `length` hex characters of HMAC-SHA256(key, value)."""
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]

    def key_check(self) -> str:
        """Return a short digest that identifies the key (the same key gives the same value)."""
        return self.digest(KEY_CHECK_INPUT)

    def user_id(self, raw_id: str) -> str:
        """Return the pseudonym of a customer id, e.g. ``u3f9a...`` (17 characters)."""
        cached = self._cache.get(raw_id)
        if cached is None:
            cached = "u" + self.digest("user:" + raw_id)
            self._cache[raw_id] = cached
        return cached
