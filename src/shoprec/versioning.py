"""Data versions with DVC: ``data.dvc`` pins the event store."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml

from shoprec.exceptions import VersioningError

logger = logging.getLogger(__name__)


def _dvc(args: list[str], cwd: Path) -> str:
    command = [sys.executable, "-m", "dvc", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise VersioningError(
            f"'dvc {' '.join(args)}' failed in {cwd} (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result.stdout


def data_version(pointer: Path) -> str | None:
    """Return the md5 that a .dvc file pins, or None when it does not exist yet."""
    if not pointer.exists():
        return None
    with pointer.open(encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    outs = content.get("outs") or [{}]
    return outs[0].get("md5")


def require_dvc_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise VersioningError(
            f"{root} is not a DVC repository (no .dvc folder); run 'dvc init' there, or set "
            "SHOPREC_DVC_ENABLED=false to ingest without versioning"
        )


def record_data_version(root: Path, data_dir: Path) -> tuple[str | None, str | None]:
    """Run ``dvc add`` on the store; return (previous md5, new md5)."""
    require_dvc_repo(root)
    target = data_dir.resolve().relative_to(root.resolve())
    pointer = root / f"{target.as_posix()}.dvc"
    previous = data_version(pointer)
    _dvc(["add", "--quiet", target.as_posix()], cwd=root)
    current = data_version(pointer)
    if current != previous:
        logger.info("new data version %s (was %s) in %s", current, previous, pointer.name)
    return previous, current


def push_data(root: Path, remote: str | None) -> bool:
    """Push the store to a DVC remote; return False (with one warning) when none is set."""
    remotes = _dvc(["remote", "list"], cwd=root).split()
    if remote is None and not remotes:
        logger.warning(
            "no DVC remote configured: data versions stay in the local cache (.dvc/cache). "
            "Add one with 'dvc remote add -d NAME URL' or set SHOPREC_DVC_REMOTE."
        )
        return False
    _dvc(["push", *(["--remote", remote] if remote else [])], cwd=root)
    return True
