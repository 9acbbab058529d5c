"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep numerical libraries to one thread each: the CI machine has two cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
LANDING_DIR = Path(
    os.environ.get(
        "SHOPREC_TEST_LANDING_DIR", REPO_ROOT.parent / "shared/data/online-retail/by-day"
    )
)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API and database for every flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def landing_dir() -> Path:
    """The real Online Retail daily files (read only)."""
    if not LANDING_DIR.is_dir():
        pytest.fail(f"real landing files not found at {LANDING_DIR}; set SHOPREC_TEST_LANDING_DIR")
    return LANDING_DIR


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real redis-server on a free loopback port, one per test module."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
