"""The Prefect flow ``monitor``: a real run that decides to retrain and runs the train flow."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from flows.monitor import monitor
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from tests.test_bundle import CANDIDATES, FEATURES, RANK
from tests.test_monitor import DAY, START, day_events, make_shop_events
from tests.test_train_flow import FAKE_PIPELINE, model_store  # noqa: F401 - pytest fixture

from shoprec import registry
from shoprec.bundle import ModelBundle
from shoprec.candidates import fit_candidate_model, generate_candidates, score_users
from shoprec.config import load_params
from shoprec.features import attach_labels, build_features, build_item_table
from shoprec.interactions import clean_purchases
from shoprec.monitor import MonitorError
from shoprec.monitor_data import recommend_batch
from shoprec.rank import train_ranker
from shoprec.store import BatchToCommit, EventStore

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_CUTOFF = pd.Timestamp("2011-07-10", tz="UTC")
CUTOFF = pd.Timestamp(DAY, tz="UTC")


def build_bundle(
    events: pd.DataFrame,
    label_cutoff: pd.Timestamp = LABEL_CUTOFF,
    cutoff: pd.Timestamp = CUTOFF,
) -> ModelBundle:
    """Train a tiny two-stage bundle on the purchases before ``cutoff``.

    The ranker learns from labels in [label_cutoff, cutoff); the bundle's training window
    ends at ``cutoff``.
    """
    purchases = clean_purchases(events[events["ts"] < cutoff])
    history = purchases[purchases["ts"] < label_cutoff]
    target = purchases[purchases["ts"] >= label_cutoff]
    model = fit_candidate_model(history, label_cutoff, CANDIDATES)
    users = pd.Index(sorted(history["user_id"].unique()))
    scores = score_users(model, history, users)
    candidates = generate_candidates(model, history, users, scores)
    items = build_item_table(history, label_cutoff, FEATURES)
    features = attach_labels(
        build_features(candidates, history, scores, model, items, label_cutoff, FEATURES), target
    )
    rankers = {
        "all": train_ranker(features, RANK),
        "new": train_ranker(features[features["from_past"] == 0], RANK),
    }
    catalogue = pd.DataFrame({"item_id": model.items.ids, "description": "thing"})
    window = {"start": str(events["ts"].min()), "end": str(cutoff)}
    return ModelBundle(
        model, items, rankers, FEATURES, history, catalogue, {"training_window": window}
    )


def commit_days(data_dir: Path, events: pd.DataFrame) -> None:
    """Write ``events`` into an event store, one batch per day."""
    store = EventStore(data_dir, data_dir.parent / "staging")
    batches = []
    for day, rows in events.groupby(events["ts"].dt.date):
        rows = rows.reset_index(drop=True)
        batches.append(
            BatchToCommit(
                batch_id=f"{day}-test",
                source_file=f"{day}.csv",
                file_sha256=str(day),
                events=rows,
                descriptions=pd.Series(["thing"] * len(rows)),
                quarantine=pd.DataFrame(
                    columns=["source_file", "line_number", "rule", "detail", "source_line"]
                ),
                counts={"rows_read": len(rows), "stored": len(rows)},
            )
        )
    store.commit(batches)


@pytest.fixture(scope="module")
def shop_events() -> pd.DataFrame:
    shifted = day_events(seed=11)
    shifted["price"] = shifted["price"] * 10
    return pd.concat([make_shop_events(START, (DAY - START).days), shifted], ignore_index=True)


@pytest.fixture(scope="module")
def bundle(shop_events: pd.DataFrame) -> ModelBundle:
    return build_bundle(shop_events)


@pytest.fixture
def project(tmp_path: Path, shop_events: pd.DataFrame, bundle: ModelBundle, monkeypatch) -> Path:
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    (project_dir / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    params = load_params(REPO_ROOT / "params.yaml")
    (project_dir / "params.yaml").write_text(
        yaml.safe_dump({"gate": params["gate"], "monitor": params["monitor"]})
    )
    commit_days(project_dir / "data", shop_events)
    monkeypatch.setenv("SHOPREC_DATA_DIR", str(project_dir / "data"))
    monkeypatch.setenv("SHOPREC_REPORTS_DIR", str(project_dir / "reports"))
    bundle.save(tmp_path / "bundle")
    return project_dir


def register_champion(bundle_dir: Path) -> str:
    metrics = {
        variant: {"two_stage": {"ndcg@10": 0.2}, "popularity": {"ndcg@10": 0.05}}
        for variant in ("all", "new")
    }
    window = json.loads((bundle_dir / "metadata.json").read_text())["training_window"]
    metadata = registry.build_metadata(
        data_version=None, params={}, metrics=metrics, training_window=window
    )
    model = registry.register_challenger(bundle_dir, metrics, metadata)
    registry.promote(model.tag)
    return str(model.tag)


@pytest.mark.slow
@pytest.mark.integration
def test_monitor_flow_retrains_on_shifted_prices(
    project: Path,
    model_store: Path,  # noqa: F811 - pytest fixture
    prefect_api: None,
) -> None:
    champion = register_champion(project.parent / "bundle")
    fake_repro = [sys.executable, "fake_pipeline.py", "0.3"]

    started = time.perf_counter()
    summary = monitor(day=DAY, project_dir=project, repro_cmd=fake_repro)
    elapsed = time.perf_counter() - started

    assert summary["model_tag"] == champion
    assert summary["decision"] == "retrain"
    assert "critical column(s) drifted: price" in summary["reasons"]
    assert summary["training"]["promoted"] is True
    assert str(registry.get_champion().tag) == summary["training"]["model_tag"]
    drift_dir = project / "reports" / "drift"
    assert json.loads((drift_dir / f"{DAY}.json").read_text())["decision"] == "retrain"
    assert (drift_dir / f"{DAY}.html").stat().st_size > 100_000
    assert f"{DAY}.html" in (drift_dir / "index.html").read_text()
    assert elapsed < 120


def test_batch_scores_match_recommend(bundle: ModelBundle, shop_events: pd.DataFrame) -> None:
    history = shop_events[shop_events["ts"] < CUTOFF]
    users = ["u003", "u010", "u042"]

    batch = recommend_batch(bundle, history, users, CUTOFF, k=5)

    for user in users:
        alone = bundle.recommend(history[history["user_id"] == user], k=5, now=CUTOFF, user_id=user)
        rows = batch[batch["user_id"] == user].reset_index(drop=True)
        assert rows["item_id"].tolist() == alone["item_id"].tolist()
        assert rows["source"].tolist() == alone["source"].tolist()
        pd.testing.assert_series_equal(rows["score"], alone["score"], check_names=False)


def test_prefect_yaml_declares_monitor_deployment_and_trigger() -> None:
    raw = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())

    config = PrefectYamlModel.model_validate(raw)

    monitor_deployment = next(d for d in config.deployments if d.name == "monitor")
    assert monitor_deployment.entrypoint == "flows/monitor.py:monitor"
    assert monitor_deployment.schedules[0].cron == "30 6 * * *"
    assert monitor_deployment.parameters == {"project_dir": ".", "start_training": False}
    train_entry = next(d for d in raw["deployments"] if d["name"] == "train")
    trigger = DeploymentEventTrigger.model_validate(train_entry["triggers"][0])
    assert trigger.expect == {"shoprec.monitor.retrain-requested"}
    assert trigger.match.get("shoprec.retrain.route") == ["automation"]
    assert trigger.match.get("prefect.resource.id") == ["shoprec.model.*"]


@pytest.mark.integration
def test_monitor_flow_rejects_empty_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: None
) -> None:
    (tmp_path / "params.yaml").write_text("monitor: {}\n")
    monkeypatch.setenv("SHOPREC_DATA_DIR", str(tmp_path / "data"))

    with pytest.raises(MonitorError, match="contains no events; run 'shoprec ingest' first"):
        monitor(project_dir=tmp_path)
