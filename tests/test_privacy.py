"""Keyed pseudonyms and key handling."""

from __future__ import annotations

import logging
import stat

import pytest

from shoprec.exceptions import ConfigError
from shoprec.privacy import Pseudonymizer, load_or_create_key


def test_pseudonym_is_stable_and_keyed():
    first = Pseudonymizer(b"k" * 32).user_id("17850")

    assert first == Pseudonymizer(b"k" * 32).user_id("17850")
    assert first != Pseudonymizer(b"j" * 32).user_id("17850")
    assert first.startswith("u")
    assert len(first) == 17
    assert "17850" not in first


def test_missing_key_is_generated_once_with_warning(tmp_path, caplog):
    key_file = tmp_path / "keys" / "pseudonym.key"

    with caplog.at_level(logging.WARNING):
        key = load_or_create_key(None, key_file)
    again = load_or_create_key(None, key_file)

    assert key == again
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "generated a new key" in caplog.text


def test_environment_key_wins_over_file(tmp_path):
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("f" * 64)

    assert load_or_create_key("e" * 32, key_file) == b"e" * 32


def test_short_key_is_rejected_with_fix():
    with pytest.raises(ConfigError, match="SHOPREC_PSEUDONYM_KEY is 5 bytes long"):
        load_or_create_key("short", None)
