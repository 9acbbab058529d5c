"""Choose the Prefect task runner of a flow from one setting.

``SHOPREC_TASK_RUNNER`` (or ``--task-runner``) takes:

- ``thread`` (the default; ``local`` is the same): a thread pool in the flow's process;
- ``process``: a pool of worker processes on this machine;
- ``dask``: ``prefect-dask``'s ``DaskTaskRunner`` on a new local Dask cluster;
- ``tcp://HOST:PORT``: ``DaskTaskRunner`` on an existing Dask scheduler.

Tasks on Dask workers report their state to the flow's Prefect API. When the flow runs
against Prefect's temporary server (no ``PREFECT_API_URL``), the local Dask cluster's worker
processes get that server's URL in their environment. Workers of an existing scheduler cannot
be given it, so ``tcp://`` needs ``PREFECT_API_URL`` set to a server they can reach.

NOTE: the ``process`` runner's workers do not get the temporary server's URL. Without
``PREFECT_API_URL``, each of them starts its own temporary Prefect server, which is slow.
"""

from __future__ import annotations

import os

from prefect import Flow
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shoprec.exceptions import ConfigError

RUNNER_CHOICES = ("thread", "process", "dask", "tcp://HOST:PORT")
LOCAL_RUNNERS = ("thread", "local")


def is_local_runner(spec: str) -> bool:
    """Return True when `spec` runs tasks in threads of the flow's own process."""
    return spec in LOCAL_RUNNERS


def build_task_runner(spec: str, max_workers: int | None = None) -> TaskRunner:
    """Build the task runner named by `spec` (see the module docstring).

    `max_workers` defaults to the CPU count, at most 4. A local Dask cluster gets that many
    single-threaded worker processes.
    """
    workers = max_workers or max(1, min(4, os.cpu_count() or 1))
    if is_local_runner(spec):
        return ThreadPoolTaskRunner(max_workers=workers)
    if spec == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if spec == "dask":
        from shoprec.dask_runner import LocalDaskTaskRunner

        return LocalDaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
        )
    if spec.startswith("tcp://"):
        from prefect_dask import DaskTaskRunner

        from shoprec.dask_runner import configured_api_url

        if not configured_api_url():
            raise ConfigError(
                f"task runner '{spec}' needs a Prefect server that the Dask workers can reach, "
                "but PREFECT_API_URL is not set; run `prefect server start` and set "
                "PREFECT_API_URL (e.g. http://HOST:4200/api) for the flow"
            )
        return DaskTaskRunner(address=spec)
    raise ConfigError(
        f"task runner '{spec}' is unknown; expected one of {', '.join(RUNNER_CHOICES)} "
        "(set SHOPREC_TASK_RUNNER or --task-runner)"
    )


def with_task_runner(flow: Flow, spec: str | None = None) -> Flow:
    """Return `flow` on the task runner named by `spec`, by default ``SHOPREC_TASK_RUNNER``."""
    if spec is None:
        from shoprec.config import Settings

        spec = Settings().task_runner
    return flow.with_options(task_runner=build_task_runner(spec))
