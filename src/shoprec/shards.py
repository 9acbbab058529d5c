"""Run per-user work in shards, on the task runner that ``SHOPREC_TASK_RUNNER`` names.

A shard is a contiguous range of the sorted user ids. Candidate generation and feature building
compute each user's rows only from that user's history and the shared fitted model, so the shard
outputs concatenated in shard order equal the output of one call over every user.

The local runners (``thread``, ``local``) run the shards one after another in this process, with
no Prefect flow, so a DVC stage does not pay for starting Prefect's temporary server. Any other
runner (``process``, ``dask``, ``tcp://HOST:PORT``) runs one Prefect task per shard in a flow
named ``<stage>-shards``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from shoprec.columns import Columns
from shoprec.exceptions import ConfigError
from shoprec.task_runners import build_task_runner, is_local_runner

logger = logging.getLogger(__name__)

ShardFunction = Callable[..., pd.DataFrame]


def split_users(user_ids: pd.Index | np.ndarray, n_shards: int) -> list[pd.Index]:
    """Split the distinct user ids, sorted, into at most `n_shards` contiguous shards.

    No shard is empty unless there are no users, in which case one empty shard is returned.
    """
    if n_shards < 1:
        raise ConfigError(f"n_shards must be at least 1, got {n_shards}; fix params.yaml")
    users = np.sort(pd.unique(np.asarray(user_ids, dtype=object)))
    if len(users) == 0:
        return [pd.Index([], dtype=object)]
    count = min(n_shards, len(users))
    return [pd.Index(part, dtype=object) for part in np.array_split(users, count)]


def rows_of_users(frame: pd.DataFrame, user_ids: pd.Index) -> pd.DataFrame:
    """Return the rows of `frame` whose user is in `user_ids`, in their original order."""
    return frame[frame[Columns.USER_ID].isin(user_ids)]


# Shard inputs are DataFrames and fitted models: NO_CACHE skips hashing them for a cache key.
@task(name="shard", cache_policy=NO_CACHE, persist_result=False)
def run_shard(function: ShardFunction, arguments: dict[str, Any]) -> pd.DataFrame:
    """Call `function` with the keyword arguments of one shard."""
    return function(**arguments)


def _run_in_flow(
    stage: str, function: ShardFunction, shards: list[dict[str, Any]], runner: str
) -> list[pd.DataFrame]:
    shard_task = run_shard.with_options(name=f"{stage}-shard")

    # The shards are closed over rather than passed as flow parameters, because Prefect would
    # try to serialize parameters (DataFrames, fitted models) to store them with the flow run.
    @flow(name=f"{stage}-shards", task_runner=build_task_runner(runner))
    def shards_flow() -> list[pd.DataFrame]:
        futures = [shard_task.submit(function, arguments) for arguments in shards]
        return [future.result() for future in futures]

    return shards_flow()


def run_shards(
    stage: str, function: ShardFunction, shards: list[dict[str, Any]], runner: str
) -> list[pd.DataFrame]:
    """Call `function(**arguments)` for each shard's arguments; return the outputs in order.

    `runner` is a task runner name of ``shoprec.task_runners``; `stage` names the flow and its
    tasks.
    """
    started = time.perf_counter()
    if is_local_runner(runner):
        outputs = [function(**arguments) for arguments in shards]
    else:
        outputs = _run_in_flow(stage, function, shards, runner)
    logger.info(
        "%s: %d shard(s) on the %s task runner in %.1fs",
        stage,
        len(shards),
        runner,
        time.perf_counter() - started,
    )
    return outputs


def run_fold_shards(
    stage: str,
    function: ShardFunction,
    shards_by_fold: dict[str, list[dict[str, Any]]],
    runner: str,
) -> dict[str, pd.DataFrame]:
    """Run the shards of every fold in one go; return each fold's outputs concatenated in order.

    One go means one flow and, with ``dask``, one local cluster for the whole stage.
    """
    flat = [arguments for shards in shards_by_fold.values() for arguments in shards]
    outputs = iter(run_shards(stage, function, flat, runner))
    return {
        fold: pd.concat([next(outputs) for _ in shards], ignore_index=True)
        for fold, shards in shards_by_fold.items()
    }
