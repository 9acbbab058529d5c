"""The Prefect flow ``train``: a real flow run on a tiny project whose pipeline is a fake script."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore
from flows.train import TrainError, train
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.flows import load_flow_from_entrypoint

from shoprec import registry

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stands in for `dvc repro`: writes a model bundle and metrics.json with the NDCG@10 it is given.
FAKE_PIPELINE = """
import json, sys
from pathlib import Path

ndcg = float(sys.argv[1])
window_end = sys.argv[2] if len(sys.argv) > 2 else "2011-11-09"
print("Running stage 'evaluate':")
Path("artifacts/model").mkdir(parents=True, exist_ok=True)
Path("artifacts/model/booster.txt").write_text("tree " + sys.argv[1])
Path("artifacts/model/metadata.json").write_text(
    json.dumps({"training_window": {"start": "2010-12-01", "end": window_end}})
)
metrics = {}
for variant in ("all", "new"):
    metrics[variant] = {
        "two_stage": {"ndcg@10": ndcg, "recall@20": 0.3},
        "popularity": {"ndcg@10": 0.05, "recall@20": 0.1},
        "buy_again": {"ndcg@10": 0.1, "recall@20": 0.2},
    }
metrics["candidate_recall"] = {"all": 0.5, "new": 0.3, "n_candidates": 200}
Path("reports").mkdir(exist_ok=True)
Path("reports/metrics.json").write_text(json.dumps(metrics))
sys.exit(int(ndcg < 0))
"""


@pytest.fixture
def model_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point BentoML at an empty store under tmp_path.

    BentoML reads BENTOML_HOME once per process and caches the store, so the fixture also swaps
    the cached store.
    """
    home = tmp_path / "bentoml"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield home / "models"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    (project_dir / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    (project_dir / "params.yaml").write_text(
        "split:\n  train_end: '2011-11-09'\n"
        "gate:\n  metric: ndcg@10\n  margin: 0.005\n"
        "serve:\n  k: 10\n"
    )
    (project_dir / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python fake_pipeline.py\n    params: [split.train_end]\n"
    )
    (project_dir / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    return project_dir


def fake_repro(ndcg: float, window_end: str = "2011-11-09") -> list[str]:
    return [sys.executable, "fake_pipeline.py", str(ndcg), window_end]


@pytest.mark.slow
@pytest.mark.integration
def test_train_flow_registers_and_promotes(
    project: Path, model_store: Path, prefect_api: None
) -> None:
    first = train(project_dir=project, repro_cmd=fake_repro(0.2))
    second = train(project_dir=project, repro_cmd=fake_repro(0.15))

    assert first["promoted"] is True
    assert first["reasons"][-1] == "no champion registered yet"
    assert second["promoted"] is False
    assert (
        "all: two_stage ndcg@10 0.1500 is more than 0.005 below champion 0.2000"
        in (second["reasons"])
    )

    champion = registry.get_champion()
    assert str(champion.tag) == first["model_tag"]
    assert bentoml.models.get(second["model_tag"]).info.labels["stage"] == "rejected"
    assert (registry.bundle_dir(champion) / "booster.txt").read_text() == "tree 0.2"

    metadata = champion.info.metadata
    assert metadata["data_version"] == "0123abcd.dir"
    assert metadata["params"] == {
        "split": {"train_end": "2011-11-09"},
        "gate": {"metric": "ndcg@10", "margin": 0.005},
    }
    assert metadata["training_window"] == {"start": "2010-12-01", "end": "2011-11-09"}
    assert metadata["metrics"]["new"]["two_stage"]["ndcg@10"] == 0.2


@pytest.mark.slow
@pytest.mark.integration
def test_gate_ignores_champion_of_other_window(
    project: Path, model_store: Path, prefect_api: None
) -> None:
    first = train(project_dir=project, repro_cmd=fake_repro(0.2, "2011-10-01"))
    second = train(project_dir=project, repro_cmd=fake_repro(0.15, "2011-11-01"))

    assert first["promoted"] is True
    assert second["promoted"] is True
    assert second["reasons"][-1] == (
        f"champion {first['model_tag']} was evaluated on another window; "
        "compared with the baselines only"
    )
    assert str(registry.get_champion().tag) == second["model_tag"]


@pytest.mark.slow
@pytest.mark.integration
def test_train_flow_skips_registered_bundle(
    project: Path, model_store: Path, prefect_api: None
) -> None:
    first = train(project_dir=project, repro_cmd=fake_repro(0.2))
    again = train(project_dir=project, repro_cmd=fake_repro(0.2))

    assert again["model_tag"] == first["model_tag"]
    assert again["promoted"] is True
    assert again["reasons"] == [f"bundle already registered as {first['model_tag']} (champion)"]
    assert len(registry.list_models()) == 1


def test_train_flow_fails_when_pipeline_fails(
    project: Path, model_store: Path, prefect_api: None
) -> None:
    with pytest.raises(TrainError, match=r"failed with exit code 1 .*\nRunning stage 'evaluate':"):
        train(project_dir=project, repro_cmd=fake_repro(-1.0))

    assert registry.list_models() == []


def test_prefect_yaml_declares_train_deployment() -> None:
    # PrefectYamlModel is the schema `prefect deploy` validates prefect.yaml with; it lives in a
    # private module of Prefect 3.9, so this import may move in a later release.
    raw = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())

    config = PrefectYamlModel.model_validate(raw)

    deployment = next(d for d in config.deployments if d.name == "train")
    assert deployment.entrypoint == "flows/train.py:train"
    assert deployment.work_pool.name == "shoprec"
    assert deployment.schedules == []
    assert set(deployment.parameters) <= set(train.parameters.properties)


def test_train_entrypoint_loads_flow_named_train() -> None:
    flow = load_flow_from_entrypoint(
        f"{REPO_ROOT / 'flows' / 'train.py'}:train", use_placeholder_flow=False
    )

    assert flow.name == "train"
