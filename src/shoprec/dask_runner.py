"""A ``DaskTaskRunner`` on a new local cluster whose workers report to the flow's Prefect API.

Kept apart from ``shoprec.task_runners`` so that importing that module does not import Dask.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_dask import DaskTaskRunner

logger = logging.getLogger(__name__)


def configured_api_url() -> str | None:
    """Return the Prefect API URL from the current settings, or None for the temporary server."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def current_api_url() -> str:
    """Return the URL of the Prefect API this process uses, starting the temporary one if needed.

    Inside a flow run the temporary server is already running, so this only reads its URL.
    """
    url = configured_api_url()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


class LocalDaskTaskRunner(DaskTaskRunner):
    """``DaskTaskRunner`` on a new local cluster whose workers use the flow's Prefect API.

    Without this, each Dask worker process starts its own temporary Prefect server on its first
    task, which takes tens of seconds on a loaded 2-core machine and can time out.
    """

    def __enter__(self) -> LocalDaskTaskRunner:
        env: dict[str, Any] = dict(self.cluster_kwargs.get("env") or {})
        env.setdefault("PREFECT_API_URL", current_api_url())
        self.cluster_kwargs["env"] = env
        logger.debug("local Dask workers use the Prefect API at %s", env["PREFECT_API_URL"])
        return super().__enter__()
