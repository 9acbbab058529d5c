"""Parameters (params.yaml) and settings (environment).

Tunable values live in ``params.yaml``, the file DVC stages and flows share;
each component validates its own section into a typed config model.
Paths, secrets and URLs are settings read from ``SHOPREC_*`` environment
variables (or a local ``.env`` file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shoprec.exceptions import ConfigError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class Settings(BaseSettings):
    """Deployment settings: where things are and the secrets to reach them."""

    model_config = SettingsConfigDict(env_prefix="SHOPREC_", env_file=".env", extra="ignore")

    landing_dir: Path = Path("../shared/data/online-retail/by-day")
    data_dir: Path = Path("data")
    reports_dir: Path = Path("reports")
    artifacts_dir: Path = Path("artifacts")
    params_file: Path = DEFAULT_PARAMS_FILE
    staging_dir: Path = Path(".shoprec/staging")
    pseudonym_key: SecretStr | None = None
    key_file: Path = Path(".shoprec/pseudonym.key")
    dvc_remote: str | None = None
    dvc_enabled: bool = True
    api_token: SecretStr | None = None
    redis_url: SecretStr | None = None
    online_db: Path = Path(".shoprec/online.sqlite")
    task_runner: str = "thread"


def load_params(path: Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml into a dict; each component validates its own section."""
    if not path.exists():
        raise ConfigError(
            f"parameters file {path} not found; run from the project root or set "
            "SHOPREC_PARAMS_FILE to its path"
        )
    with path.open(encoding="utf-8") as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def params_section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return one section of the parameters, with a clear error when it is missing."""
    if name not in params:
        raise ConfigError(
            f"section '{name}' missing from params.yaml; expected one of {sorted(params)}"
        )
    return params[name]
