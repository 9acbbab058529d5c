"""Choose the Prefect task runner of a flow from one setting.

``SHOPREC_TASK_RUNNER`` (or ``--task-runner``) takes:

- ``thread``: a thread pool in the flow's process;
- ``process``: a pool of worker processes on this machine (the default for ingestion,
  whose per-file work is CPU-bound Python);
- ``dask``: ``prefect-dask``'s ``DaskTaskRunner`` on a new local Dask cluster;
- ``tcp://HOST:PORT``: ``DaskTaskRunner`` on an existing Dask scheduler.

NOTE: worker processes (``process`` and both Dask runners) must reach the Prefect API.
Without ``PREFECT_API_URL``, each worker starts its own temporary server, which is slow and
on a loaded machine can time out; run ``prefect server start`` and set ``PREFECT_API_URL``.
"""

from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shoprec.exceptions import ConfigError

RUNNER_CHOICES = ("thread", "process", "dask", "tcp://HOST:PORT")


def build_task_runner(spec: str, max_workers: int | None = None) -> TaskRunner:
    """Return the task runner named by `spec` (see the module docstring)."""
    workers = max_workers or max(1, min(4, os.cpu_count() or 1))
    if spec in ("thread", "local"):
        return ThreadPoolTaskRunner(max_workers=workers)
    if spec == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if spec == "dask" or spec.startswith("tcp://"):
        from prefect_dask import DaskTaskRunner

        if spec == "dask":
            return DaskTaskRunner(
                cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
            )
        return DaskTaskRunner(address=spec)
    raise ConfigError(
        f"task runner '{spec}' is unknown; expected one of {', '.join(RUNNER_CHOICES)} "
        "(set SHOPREC_TASK_RUNNER or --task-runner)"
    )
