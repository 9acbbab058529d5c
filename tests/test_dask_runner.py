"""The Dask task runner gives the results of the local runner: ingestion and the training stages.

The integration test ingests six real landing days twice: once with
``SHOPREC_TASK_RUNNER=thread`` and once with ``dask``, a real LocalCluster of two single-threaded
worker processes. It then runs the candidates and features stages on the store with both
runners and with one shard, and compares every output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings

from shoprec.exceptions import ConfigError
from shoprec.shards import run_fold_shards, split_users
from shoprec.task_runners import build_task_runner

REPO_ROOT = Path(__file__).resolve().parents[1]
DAYS = [f"2011-11-{day:02d}.csv" for day in (1, 2, 3, 4, 6, 7)]
STAGE_FILES = [
    "candidates/train/candidates.parquet",
    "candidates/test/candidates.parquet",
    "features/train.parquet",
    "features/test.parquet",
    "features/train_items.parquet",
    "features/test_items.parquet",
]


def test_split_users_sorted_contiguous_shards() -> None:
    shards = split_users(np.array(["u5", "u1", "u3", "u1", "u7", "u4", "u2", "u6"]), 3)

    assert [list(shard) for shard in shards] == [["u1", "u2", "u3"], ["u4", "u5"], ["u6", "u7"]]


def test_split_users_never_returns_empty_shards() -> None:
    assert [list(shard) for shard in split_users(pd.Index(["b", "a"]), 5)] == [["a"], ["b"]]
    assert [list(shard) for shard in split_users(pd.Index([], dtype=object), 4)] == [[]]


def test_split_users_rejects_zero_shards() -> None:
    with pytest.raises(ConfigError, match="n_shards must be at least 1, got 0"):
        split_users(pd.Index(["a"]), 0)


def test_unknown_task_runner_is_rejected() -> None:
    with pytest.raises(ConfigError, match="task runner 'spark' is unknown; expected one of"):
        build_task_runner("spark")


def test_scheduler_address_needs_prefect_api_url() -> None:
    no_api_url = temporary_settings(restore_defaults={PREFECT_API_URL})
    with no_api_url, pytest.raises(ConfigError, match="PREFECT_API_URL is not set; run `prefect"):
        build_task_runner("tcp://127.0.0.1:8786")


def label_rows(user: str, n_rows: int) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [user] * n_rows, "row": range(n_rows)})


def test_fold_shards_concatenate_in_shard_order() -> None:
    shards = {
        "train": [{"user": "a", "n_rows": 2}, {"user": "b", "n_rows": 1}],
        "test": [{"user": "c", "n_rows": 1}],
    }

    frames = run_fold_shards("test-stage", label_rows, shards, "thread")

    assert list(frames) == ["train", "test"]
    assert frames["train"]["user_id"].tolist() == ["a", "a", "b"]
    assert frames["train"].index.tolist() == [0, 1, 2]
    assert frames["test"]["user_id"].tolist() == ["c"]


def run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)


def small_params() -> dict[str, Any]:
    """params.yaml with split windows inside the six days and a small candidate model."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["split"].update(
        fit_end="2011-11-03", train_end="2011-11-05", test_end="2011-11-08", anchor="fixed"
    )
    params["candidates"].update(
        als_factors=16, als_iterations=5, n_past=50, n_als=30, n_copurchase=30, n_knn=20,
        n_popularity=30, n_neighbours=30, n_shards=3,
    )  # fmt: skip
    params["features"].update(popularity_windows=[1, 3], n_shards=3)
    return params


def make_project(root: Path, landing: Path) -> Path:
    """A fresh git + DVC project at `root` whose params.yaml is `small_params()`."""
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(small_params()), encoding="utf-8")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    return root


def ingest_with(
    runner: str, root: Path, landing: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Run the ingest flow in project `root` on the task runner that SHOPREC_TASK_RUNNER names."""
    from flows.ingest import ingest

    from shoprec.task_runners import with_task_runner

    monkeypatch.chdir(root)
    monkeypatch.setenv("SHOPREC_TASK_RUNNER", runner)
    # An absolute reports folder per project: validate.py caches its GX context by the folder
    # name as given, so a relative name would send Data Docs to the first project's folder.
    monkeypatch.setenv("SHOPREC_REPORTS_DIR", str(root / "reports"))
    return with_task_runner(ingest)(landing_dir=str(landing))


def run_stages_with(
    runner: str, data_dir: Path, artifacts_dir: Path, n_shards: int | None = None
) -> None:
    from shoprec.config import load_params
    from shoprec.stages import run_candidates, run_features

    params = load_params(data_dir.parent / "params.yaml")
    if n_shards is not None:
        params["candidates"]["n_shards"] = n_shards
        params["features"]["n_shards"] = n_shards
    run_candidates(params, data_dir, artifacts_dir, runner)
    run_features(params, data_dir, artifacts_dir, runner)


def sorted_events(data_dir: Path) -> pd.DataFrame:
    from shoprec.store import read_events

    events = read_events(data_dir)
    return events.sort_values("event_id", kind="stable").reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.integration
def test_dask_runner_matches_local_runner(
    tmp_path: Path, landing_dir: Path, prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    for day in DAYS:
        shutil.copy(landing_dir / day, landing / day)
    monkeypatch.setenv("SHOPREC_PSEUDONYM_KEY", "dask-test-key-0123456789abcdef")
    monkeypatch.delenv("SHOPREC_DVC_REMOTE", raising=False)
    local_root = make_project(tmp_path / "local", landing)
    dask_root = make_project(tmp_path / "dask", landing)

    local = ingest_with("thread", local_root, landing, monkeypatch)
    on_dask = ingest_with("dask", dask_root, landing, monkeypatch)

    assert local["files_ingested"] == len(DAYS)
    assert on_dask["files_ingested"] == len(DAYS)
    assert on_dask["files_rejected"] == {}
    assert on_dask["totals"] == local["totals"]
    assert on_dask["files"] == local["files"]
    assert local["data_version"] is not None
    assert on_dask["data_version"] == local["data_version"]
    assert (dask_root / "data.dvc").read_text() == (local_root / "data.dvc").read_text()
    assert (dask_root / "reports/validation/data_docs/index.html").exists()
    local_events = sorted_events(local_root / "data")
    assert len(local_events) == local["totals"]["stored"]
    pd.testing.assert_frame_equal(sorted_events(dask_root / "data"), local_events)

    # The stages read the store ingested by the local runner. small_params() sets 3 shards, and
    # one shard is the same computation as before sharding existed.
    data_dir = local_root / "data"
    run_stages_with("thread", data_dir, tmp_path / "artifacts-local")
    run_stages_with("dask", data_dir, tmp_path / "artifacts-dask")
    run_stages_with("thread", data_dir, tmp_path / "artifacts-one-shard", n_shards=1)

    for name in STAGE_FILES:
        expected = pd.read_parquet(tmp_path / "artifacts-local" / name)
        assert len(expected) > 0, name
        assert (tmp_path / "artifacts-one-shard" / name).read_bytes() == (
            tmp_path / "artifacts-local" / name
        ).read_bytes(), name
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "artifacts-dask" / name), expected, check_exact=True
        )
    features = pd.read_parquet(tmp_path / "artifacts-dask/features/test.parquet")
    assert features["user_id"].nunique() >= 3
    assert features["label"].sum() > 0
