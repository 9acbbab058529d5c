"""A small real model for the serving tests: two weeks of real data, ingested and trained.

The landing files are parsed by the real adapter, validated by the real GX suite and committed
to a temporary event store. A two-stage bundle with small ALS and LightGBM settings is trained
on them and saved, in about 15 seconds on two cores. The bundle is built once per test session
and shared by the test modules that need it. Helpers here also register it in a BentoML store
(a subprocess, because BENTOML_HOME is read when bentoml is imported) and start `bentoml serve`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest

from shoprec.columns import CatalogueColumns, Columns

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PSEUDONYM_KEY = "serving-test-key-0123456789abcdef"
API_TOKEN = "serving-test-token-0123"
# Two trading weeks of November 2011: enough repeat buyers to train the ranker.
LANDING_FILES = [
    f"2011-11-{day:02d}.csv" for day in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)
]
LABEL_DAYS = 4
STARTUP_TIMEOUT_S = 120

REGISTER_CHAMPION = """
import sys
from pathlib import Path
from shoprec import registry
model = registry.register_challenger(Path(sys.argv[1]), {}, {"note": sys.argv[2]})
registry.promote(model.tag)
print(model.tag)
"""


@dataclass(frozen=True)
class TrainedBundle:
    """A saved bundle with the purchases it was trained on (user ids are pseudonyms)."""

    directory: Path
    purchases: pd.DataFrame
    catalogue: pd.DataFrame
    cutoff: pd.Timestamp


_built: dict[str, TrainedBundle] = {}


def ingest_landing_files(landing_dir: Path, data_dir: Path) -> None:
    """Parse, validate (GX) and commit LANDING_FILES into an event store at `data_dir`."""
    from shoprec.config import load_params, params_section
    from shoprec.ingest import (
        IngestConfig,
        build_adapter,
        finalize_batch,
        parse_file,
        validate_files,
    )
    from shoprec.privacy import Pseudonymizer
    from shoprec.store import EventStore
    from shoprec.validate import ValidationConfig

    params = load_params(PROJECT_ROOT / "params.yaml")
    validation = ValidationConfig(**params_section(params, "validate"))
    adapter = build_adapter(
        IngestConfig(**params_section(params, "ingest")), Pseudonymizer(PSEUDONYM_KEY.encode())
    )
    outcomes = [parse_file(landing_dir / name, adapter, validation) for name in LANDING_FILES]
    outcomes = validate_files(outcomes, validation)
    batches = [finalize_batch(outcome.batch, set()) for outcome in outcomes]
    EventStore(data_dir, data_dir / ".staging").commit(batches)


def train_bundle(data_dir: Path, out_dir: Path) -> TrainedBundle:
    """Train a small two-stage bundle on the store at `data_dir` and save it to `out_dir`."""
    from shoprec.bundle import ModelBundle
    from shoprec.candidates import (
        CandidatesConfig,
        fit_candidate_model,
        generate_candidates,
        score_users,
    )
    from shoprec.features import FeaturesConfig, attach_labels, build_features, build_item_table
    from shoprec.interactions import clean_purchases
    from shoprec.rank import RankConfig, train_ranker
    from shoprec.store import read_catalogue, read_events

    candidates_config = CandidatesConfig(
        als_factors=16, als_iterations=8, n_past=50, n_als=30, n_copurchase=30, n_knn=20,
        n_popularity=30, n_neighbours=30, num_threads=1,
    )  # fmt: skip
    features_config = FeaturesConfig(popularity_windows=[7, 14])
    rank_config = RankConfig(
        num_boost_round=40, early_stopping_rounds=10, min_data_in_leaf=20, num_leaves=15,
        n_models=1, max_negatives=30, num_threads=1,
    )  # fmt: skip

    purchases = clean_purchases(read_events(data_dir))
    cutoff = purchases[Columns.TS].max().normalize() + pd.Timedelta(days=1)
    label_cutoff = cutoff - pd.Timedelta(days=LABEL_DAYS)

    # The ranker learns which candidates of the history before label_cutoff were bought after it.
    history = purchases[purchases[Columns.TS] < label_cutoff]
    target = purchases[purchases[Columns.TS] >= label_cutoff]
    fold_model = fit_candidate_model(history, label_cutoff, candidates_config)
    users = pd.Index(sorted(set(history[Columns.USER_ID]) & set(target[Columns.USER_ID])))
    scores = score_users(fold_model, history, users)
    candidates = generate_candidates(fold_model, history, users, scores)
    fold_items = build_item_table(history, label_cutoff, features_config)
    features = attach_labels(
        build_features(
            candidates, history, scores, fold_model, fold_items, label_cutoff, features_config
        ),
        target,
    )
    rankers = {
        "all": train_ranker(features, rank_config),
        "new": train_ranker(features[features["from_past"] == 0], rank_config),
    }

    # Serving uses candidates fitted on every purchase, as the rank stage does.
    model = fit_candidate_model(purchases, cutoff, candidates_config)
    catalogue = read_catalogue(data_dir)
    catalogue = catalogue[catalogue[CatalogueColumns.ITEM_ID].isin(model.items.ids)]
    bundle = ModelBundle(
        candidate_model=model,
        item_table=build_item_table(purchases, cutoff, features_config),
        rankers=rankers,
        features_config=features_config,
        purchases=purchases,
        catalogue=catalogue.reset_index(drop=True),
        metadata={"training_window": {"end": str(cutoff)}, "note": "serving tests"},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle.save(out_dir)
    return TrainedBundle(out_dir, purchases, catalogue.reset_index(drop=True), cutoff)


def shared_bundle(landing_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedBundle:
    """Build the bundle on the first call of the session; return the same one afterwards."""
    if "bundle" not in _built:
        root = tmp_path_factory.mktemp("serving_bundle")
        ingest_landing_files(landing_dir, root / "data")
        _built["bundle"] = train_bundle(root / "data", root / "model")
    return _built["bundle"]


def corrupt_copy(bundle_dir: Path, target: Path) -> Path:
    """Copy a bundle and overwrite its first LightGBM booster file with garbage."""
    shutil.copytree(bundle_dir, target)
    boosters = sorted(target.glob("ranker_*.txt"))
    boosters[0].write_text("this is not a LightGBM model\n", encoding="utf-8")
    return target


def service_env(bentoml_home: Path) -> dict[str, str]:
    """Environment of a bentoml subprocess: its own store, test secrets, one thread."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONPATH": str(PROJECT_ROOT / "src"),
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "SHOPREC_API_TOKEN": API_TOKEN,
        "SHOPREC_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "SHOPREC_ONLINE_DB": str(bentoml_home / "online.sqlite"),
        "SHOPREC_PARAMS_FILE": str(PROJECT_ROOT / "params.yaml"),
        # One worker: quicker to start, and POST /reload then reaches the only worker.
        "SHOPREC_WORKERS": "1",
    }
    for name in ("SHOPREC_REDIS_URL", "SHOPREC_INSECURE_LOCAL", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    return env


def register_champion(bundle_dir: Path, env: dict[str, str], note: str = "test") -> str:
    """Register `bundle_dir` in the store of `env` and promote it; return its tag."""
    result = subprocess.run(
        [sys.executable, "-c", REGISTER_CHAMPION, str(bundle_dir), note],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"registering {bundle_dir} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"bentoml serve exited early:\n{log_file.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"bentoml serve not ready after {STARTUP_TIMEOUT_S}s:\n{log_file.read_text()[-3000:]}"
    )


def start_serve(
    target: str, env: dict[str, str], log_file: Path, cwd: Path
) -> tuple[subprocess.Popen, str]:
    """Start `bentoml serve target` on a free loopback port; return the process and base URL."""
    port = free_port()
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "bentoml", "serve", target,
                "--host", "127.0.0.1", "--port", str(port),
            ],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def stop_serve(process: subprocess.Popen) -> None:
    """Stop a server started by `start_serve` and all its workers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def bentoml_serve(target: str, env: dict[str, str], log_file: Path, cwd: Path) -> Iterator[str]:
    """Run `bentoml serve target` on a free loopback port; yield its base URL, then stop it."""
    process, url = start_serve(target, env, log_file, cwd)
    try:
        wait_until_ready(url, process, log_file)
        yield url
    finally:
        stop_serve(process)
