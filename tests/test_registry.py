"""Registry and promotion gate, against a real BentoML model store in a temporary directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import pytest
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore

from shoprec import registry
from shoprec.registry import GateConfig, RegistryError, decide_promotion


@pytest.fixture
def model_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point BentoML at an empty store under tmp_path for one test.

    BentoML reads BENTOML_HOME once per process and caches the store, so besides setting the
    variable the fixture swaps the cached store for one in the temporary directory.
    """
    home = tmp_path / "bentoml"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield home / "models"


def make_metrics(two_stage: float, best_baseline: float = 0.10) -> dict[str, Any]:
    """Metrics in the layout of reports/metrics.json with one score per model and variant."""
    metrics: dict[str, Any] = {}
    for variant in ("all", "new"):
        metrics[variant] = {
            "two_stage": {"ndcg@10": two_stage, "recall@20": 0.3},
            "popularity": {"ndcg@10": best_baseline / 2, "recall@20": 0.1},
            "buy_again": {"ndcg@10": best_baseline, "recall@20": 0.2},
        }
    metrics["candidate_recall"] = {"all": 0.5, "new": 0.3, "n_candidates": 200}
    return metrics


def make_bundle(tmp_path: Path, name: str = "model") -> Path:
    bundle = tmp_path / name
    (bundle / "ranker").mkdir(parents=True)
    (bundle / "ranker" / "booster.txt").write_text("tree")
    (bundle / "metadata.json").write_text(json.dumps({"training_window": {"end": "2011-11-09"}}))
    return bundle


def register(tmp_path: Path, metrics: dict[str, Any], name: str = "model") -> bentoml.Model:
    metadata = registry.build_metadata(data_version="abc.dir", params={"gate": {}}, metrics={})
    return registry.register_challenger(make_bundle(tmp_path, name), metrics, metadata)


def test_register_copies_bundle(tmp_path: Path, model_store: Path) -> None:
    model = register(tmp_path, make_metrics(0.2))

    assert model.tag.name == "shoprec"
    assert model.info.labels == {"stage": "challenger"}
    assert Path(model.path).is_relative_to(model_store)
    assert (registry.bundle_dir(model) / "ranker" / "booster.txt").read_text() == "tree"
    assert model.info.metadata["metrics"]["all"]["two_stage"]["ndcg@10"] == 0.2
    assert model.info.metadata["data_version"] == "abc.dir"


def test_register_rejects_missing_bundle(tmp_path: Path, model_store: Path) -> None:
    with pytest.raises(RegistryError, match=r"model bundle directory .*missing or empty"):
        registry.register_challenger(tmp_path / "absent", make_metrics(0.2), {})


def test_register_rejects_bundle_with_model_yaml(tmp_path: Path, model_store: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "model.yaml").write_text("x: 1")

    with pytest.raises(RegistryError, match=r"\['model.yaml'\], which BentoML writes itself"):
        registry.register_challenger(bundle, make_metrics(0.2), {})


def test_metadata_has_data_version_from_dvc_file(tmp_path: Path, model_store: Path) -> None:
    dvc_file = tmp_path / "data.dvc"
    dvc_file.write_text(
        "outs:\n- md5: 3f2a9c0d1e.dir\n  size: 1024\n  nfiles: 3\n  hash: md5\n  path: data\n"
    )
    metadata = registry.build_metadata(
        data_version=registry.read_data_version(dvc_file),
        params={"gate": {"margin": 0.005}, "als": {"factors": 64, "iterations": None}},
        metrics={},
        training_window={"start": "2010-12-01", "end": "2011-11-09"},
    )

    model = registry.register_challenger(make_bundle(tmp_path), make_metrics(0.2), metadata)

    stored = model.info.metadata
    assert stored["data_version"] == "3f2a9c0d1e.dir"
    assert stored["params"] == {"gate": {"margin": 0.005}, "als": {"factors": 64}}
    assert stored["training_window"] == {"start": "2010-12-01", "end": "2011-11-09"}
    assert stored["created_at"].endswith("+00:00")


def test_metadata_without_dvc_file(tmp_path: Path, model_store: Path) -> None:
    data_version = registry.read_data_version(tmp_path / "data.dvc")
    metadata = registry.build_metadata(data_version=data_version, params={}, metrics={})

    model = registry.register_challenger(make_bundle(tmp_path), make_metrics(0.2), metadata)

    assert data_version is None
    assert model.info.metadata.get("data_version") is None


def test_data_version_requires_md5(tmp_path: Path) -> None:
    dvc_file = tmp_path / "data.dvc"
    dvc_file.write_text("outs:\n- path: data\n")

    with pytest.raises(RegistryError, match=r"has no 'outs\[0\].md5'; run 'dvc add data'"):
        registry.read_data_version(dvc_file)


def test_no_champion_in_empty_store(model_store: Path) -> None:
    assert registry.get_champion() is None


def test_promote_moves_champion_label(tmp_path: Path, model_store: Path) -> None:
    first = register(tmp_path, make_metrics(0.2), "first")
    registry.promote(first.tag)
    second = register(tmp_path, make_metrics(0.3), "second")

    promoted = registry.promote(second.tag)

    assert promoted.info.labels["stage"] == "champion"
    assert bentoml.models.get(first.tag).info.labels["stage"] == "retired"
    assert registry.get_champion().tag == second.tag


def test_get_champion_prefers_newest(tmp_path: Path, model_store: Path) -> None:
    first = register(tmp_path, make_metrics(0.2), "first")
    second = register(tmp_path, make_metrics(0.3), "second")
    registry._set_labels(first, {"stage": "champion"})
    registry._set_labels(second, {"stage": "champion"})

    assert registry.get_champion().tag == second.tag


def test_reject_labels_challenger(tmp_path: Path, model_store: Path) -> None:
    model = register(tmp_path, make_metrics(0.2))

    assert registry.reject(model.tag).info.labels["stage"] == "rejected"
    assert registry.get_champion() is None


def test_gate_promotes_first_challenger() -> None:
    decision = decide_promotion(make_metrics(0.2), None, margin=0.005)

    assert decision.promote is True
    assert decision.reasons == [
        "all: two_stage ndcg@10 0.2000 beats best baseline buy_again 0.1000",
        "new: two_stage ndcg@10 0.2000 beats best baseline buy_again 0.1000",
        "no champion registered yet",
    ]


def test_gate_rejects_baseline_tie() -> None:
    challenger = make_metrics(0.2)
    challenger["new"]["two_stage"]["ndcg@10"] = 0.1  # ties buy_again in variant new

    decision = decide_promotion(challenger, None, margin=0.005)

    assert decision.promote is False
    assert "new: two_stage ndcg@10 0.1000 does not beat best baseline buy_again 0.1000" in (
        decision.reasons
    )


def test_gate_rejects_drop_beyond_margin() -> None:
    decision = decide_promotion(make_metrics(0.2), make_metrics(0.21), margin=0.005)

    assert decision.promote is False
    assert "all: two_stage ndcg@10 0.2000 is more than 0.005 below champion 0.2100" in (
        decision.reasons
    )


def test_gate_accepts_drop_within_margin() -> None:
    decision = decide_promotion(make_metrics(0.2), make_metrics(0.204), margin=0.005)

    assert decision.promote is True
    assert "new: two_stage ndcg@10 0.2000 is within 0.005 below champion 0.2040" in (
        decision.reasons
    )


def test_gate_skips_champion_without_metric() -> None:
    decision = decide_promotion(make_metrics(0.2), {"all": {}}, margin=0.005)

    assert decision.promote is True
    assert "new: champion has no ndcg@10; champion comparison skipped" in decision.reasons


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"new": {}}, r"challenger metrics have no 'all.two_stage' entry"),
        (
            {"all": {"two_stage": {"ndcg@10": 0.2}}},
            r"variant 'all' contain no baseline",
        ),
        (
            {"all": {"two_stage": {"ndcg@10": 0.2}, "als": {"recall@20": 0.1}}},
            r"'all.als' have no 'ndcg@10'; set 'gate.metric'",
        ),
    ],
)
def test_gate_rejects_malformed_metrics(metrics: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        decide_promotion(metrics, None, margin=0.005)


def test_gate_config_rejects_negative_margin() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GateConfig.model_validate({"margin": -0.1})


def test_gate_sequence_sets_stages(tmp_path: Path, model_store: Path) -> None:
    champion = register(tmp_path, make_metrics(0.2), "champion")
    registry.promote(champion.tag)
    worse = register(tmp_path, make_metrics(0.18), "worse")
    better = register(tmp_path, make_metrics(0.25), "better")

    for model in (worse, better):
        current = registry.get_champion()
        decision = decide_promotion(
            model.info.metadata["metrics"], current.info.metadata["metrics"], margin=0.005
        )
        if decision.promote:
            registry.promote(model.tag)
        else:
            registry.reject(model.tag)

    stages = {m.tag: m.info.labels["stage"] for m in registry.list_models()}
    assert stages == {champion.tag: "retired", worse.tag: "rejected", better.tag: "champion"}


def test_select_params_from_dvc_yaml() -> None:
    params = {"split": {"a": 1}, "als": {"factors": 8}, "gate": {"margin": 0.0}, "serve": {}}
    dvc_stages = {
        "stages": {
            "candidates": {"params": ["als.factors", "split"]},
            "evaluate": {"params": [{"params.yaml": ["split.test_end"]}, {"other.yaml": ["x"]}]},
        }
    }

    selected = registry.select_pipeline_params(params, dvc_stages)

    assert selected == {"split": {"a": 1}, "als": {"factors": 8}, "gate": {"margin": 0.0}}
