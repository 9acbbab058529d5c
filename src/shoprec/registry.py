"""Model registry on the BentoML model store: register, gate and promote.

Every trained bundle becomes one BentoML model named ``shoprec``. Its label ``stage`` is
``challenger`` when registered, ``champion`` once promoted, ``retired`` when a newer champion
replaced it, and ``rejected`` when it failed the promotion gate. The store
location follows BentoML: ``$BENTOML_HOME/models``, by default ``~/bentoml/models``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import yaml
from pydantic import BaseModel, ConfigDict, Field

from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

MODEL_NAME = "shoprec"
STAGE_LABEL = "stage"
CHAMPION = "champion"
CHALLENGER = "challenger"
RETIRED = "retired"
REJECTED = "rejected"

# Key of the two-stage model in reports/metrics.json. Every other model key is a baseline.
TWO_STAGE = "two_stage"
METRIC_VARIANTS = ("all", "new")

# Files that BentoML writes into a model directory itself.
_BENTOML_RESERVED_FILES = frozenset({"model.yaml", "custom_objects.pkl"})


class RegistryError(ShoprecError):
    """The model store, a model in it or the metrics given to the gate are invalid."""


class GateConfig(BaseModel):
    """The ``gate`` section of params.yaml: when a challenger may replace the champion."""

    model_config = ConfigDict(extra="forbid")

    metric: str = "ndcg@10"
    margin: float = Field(default=0.005, ge=0.0)
    variants: tuple[str, ...] = METRIC_VARIANTS


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the promotion gate, with one reason per check made."""

    promote: bool
    reasons: list[str] = field(default_factory=list)


def read_data_version(dvc_file: Path) -> str | None:
    """Read the md5 of the first output of a ``.dvc`` file, or None when the file is missing."""
    if not dvc_file.exists():
        logger.warning("%s not found; the model is registered without a data version", dvc_file)
        return None

    with dvc_file.open(encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    outs = content.get("outs") if isinstance(content, dict) else None
    if not outs or not isinstance(outs[0], dict) or "md5" not in outs[0]:
        raise RegistryError(
            f"{dvc_file} has no 'outs[0].md5'; run 'dvc add data' (or 'dvc commit') to record "
            "the data version"
        )
    return str(outs[0]["md5"])


def select_pipeline_params(
    params: dict[str, Any], dvc_stages: dict[str, Any] | None, extra: Iterable[str] = ("gate",)
) -> dict[str, Any]:
    """Keep the params.yaml sections that dvc.yaml stages list, plus ``extra`` sections.

    ``dvc_stages`` is the parsed dvc.yaml. Without it every section is kept.
    """
    if not dvc_stages:
        return dict(params)

    sections: set[str] = set(extra)
    for stage in (dvc_stages.get("stages") or {}).values():
        for entry in stage.get("params") or []:
            if isinstance(entry, str):
                sections.add(entry.split(".", 1)[0])
            elif isinstance(entry, dict):
                # A mapping names a params file. Only keys of params.yaml are recorded.
                for key in entry.get("params.yaml") or []:
                    sections.add(str(key).split(".", 1)[0])
    return {name: value for name, value in params.items() if name in sections}


def build_metadata(
    *,
    data_version: str | None,
    params: dict[str, Any],
    metrics: dict[str, Any],
    training_window: dict[str, str] | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """Assemble the metadata stored with a registered model."""
    metadata: dict[str, Any] = {
        "data_version": data_version,
        "params": params,
        "metrics": metrics,
        "training_window": training_window,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
    }
    return metadata


def register_challenger(
    model_dir: Path, metrics: dict[str, Any], metadata: dict[str, Any]
) -> bentoml.Model:
    """Copy a saved model bundle into the BentoML store as a new challenger.

    ``metrics`` is stored under the ``metrics`` metadata key, replacing any value there.
    """
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise RegistryError(
            f"model bundle directory {model_dir} is missing or empty; run the training "
            "pipeline ('dvc repro') first"
        )
    reserved = sorted(p.name for p in model_dir.iterdir() if p.name in _BENTOML_RESERVED_FILES)
    if reserved:
        raise RegistryError(
            f"model bundle {model_dir} contains {reserved}, which BentoML writes itself; "
            "rename these files in the bundle"
        )

    stored_metadata = _to_bentoml_metadata({**metadata, "metrics": metrics})
    with bentoml.models.create(
        name=MODEL_NAME, labels={STAGE_LABEL: CHALLENGER}, metadata=stored_metadata
    ) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)

    # The object yielded by create() points at a temporary directory, so reload it from the store.
    registered = bentoml.models.get(model.tag)
    logger.info("registered %s as %s from %s", registered.tag, CHALLENGER, model_dir)
    return registered


def bundle_dir(model: bentoml.Model) -> Path:
    """Return the directory of a registered model that ``ModelBundle.load`` reads."""
    return Path(model.path)


def list_models() -> list[bentoml.Model]:
    """List every registered shoprec model, newest first."""
    models = [m for m in bentoml.models.list() if m.tag.name == MODEL_NAME]
    return sorted(models, key=lambda m: m.info.creation_time, reverse=True)


def bundle_fingerprint(model_dir: Path) -> str:
    """Return a SHA-256 over the bundle's file names and contents (same bundle, same value)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode("utf-8"))
        digest.update(path.read_bytes())
    return digest.hexdigest()


def find_registered(fingerprint: str) -> bentoml.Model | None:
    """Return the newest registered model whose metadata has this bundle fingerprint."""
    for model in list_models():
        if model.info.metadata.get("bundle_sha256") == fingerprint:
            return model
    return None


def get_champion() -> bentoml.Model | None:
    """Return the current champion, or None before the first promotion."""
    champions = [m for m in list_models() if m.info.labels.get(STAGE_LABEL) == CHAMPION]
    if not champions:
        return None
    if len(champions) > 1:
        logger.warning(
            "%d models are labelled %s=%s (%s); using the newest",
            len(champions),
            STAGE_LABEL,
            CHAMPION,
            ", ".join(str(m.tag) for m in champions),
        )
    return champions[0]


def promote(tag: str | bentoml.Tag) -> bentoml.Model:
    """Make the model ``tag`` the champion and retire every other champion."""
    model = bentoml.models.get(tag)
    if model.tag.name != MODEL_NAME:
        raise RegistryError(f"model {model.tag} is not a {MODEL_NAME} model; pass a shoprec tag")

    # NOTE: labels are rewritten one model at a time without a lock, so two promotions running
    # at the same moment can leave two champions. get_champion() then picks the newest.
    for other in list_models():
        if other.tag != model.tag and other.info.labels.get(STAGE_LABEL) == CHAMPION:
            _set_labels(other, {STAGE_LABEL: RETIRED})
            logger.info("retired former champion %s", other.tag)

    promoted = _set_labels(model, {STAGE_LABEL: CHAMPION})
    logger.info("promoted %s to %s", promoted.tag, CHAMPION)
    return promoted


def reject(tag: str | bentoml.Tag) -> bentoml.Model:
    """Label a challenger that failed the gate as rejected; ``promote`` can still override."""
    model = bentoml.models.get(tag)
    rejected = _set_labels(model, {STAGE_LABEL: REJECTED})
    logger.info("labelled %s as %s", rejected.tag, REJECTED)
    return rejected


def decide_promotion(
    challenger_metrics: dict[str, Any],
    champion_metrics: dict[str, Any] | None,
    margin: float,
    *,
    metric: str = "ndcg@10",
    variants: Iterable[str] = METRIC_VARIANTS,
) -> GateDecision:
    """Decide whether a challenger replaces the champion.

    In every variant the challenger's two-stage ``metric`` must be higher than the best
    baseline's, and at most ``margin`` below the champion's two-stage value.
    """
    if margin < 0:
        raise RegistryError(f"gate margin must be >= 0, got {margin}; fix 'gate.margin'")

    promote_ok = True
    reasons: list[str] = []
    for variant in variants:
        scores = _variant_scores(challenger_metrics, variant, metric, "challenger")
        challenger_score = scores.pop(TWO_STAGE)
        if not scores:
            raise RegistryError(
                f"challenger metrics for variant '{variant}' contain no baseline; "
                "expected popularity, buy_again, als or item_knn beside two_stage"
            )

        best_baseline = max(scores, key=lambda name: scores[name])
        beats_baseline = challenger_score > scores[best_baseline]
        verb = "beats" if beats_baseline else "does not beat"
        reasons.append(
            f"{variant}: two_stage {metric} {challenger_score:.4f} {verb} best baseline "
            f"{best_baseline} {scores[best_baseline]:.4f}"
        )
        promote_ok = promote_ok and beats_baseline

        if champion_metrics is None:
            continue
        champion_score = _champion_score(champion_metrics, variant, metric)
        if champion_score is None:
            reasons.append(f"{variant}: champion has no {metric}; champion comparison skipped")
            continue
        within_margin = challenger_score >= champion_score - margin
        verb = "is within" if within_margin else "is more than"
        reasons.append(
            f"{variant}: two_stage {metric} {challenger_score:.4f} {verb} {margin} below "
            f"champion {champion_score:.4f}"
        )
        promote_ok = promote_ok and within_margin

    if champion_metrics is None:
        reasons.append("no champion registered yet")
    return GateDecision(promote=promote_ok, reasons=reasons)


def _variant_scores(
    metrics: dict[str, Any], variant: str, metric: str, owner: str
) -> dict[str, float]:
    models = metrics.get(variant)
    if not isinstance(models, dict) or TWO_STAGE not in models:
        raise RegistryError(
            f"{owner} metrics have no '{variant}.{TWO_STAGE}' entry; expected the layout of "
            "reports/metrics.json written by the evaluate stage"
        )

    scores: dict[str, float] = {}
    for name, values in models.items():
        if not isinstance(values, dict) or metric not in values:
            raise RegistryError(
                f"{owner} metrics for '{variant}.{name}' have no '{metric}'; set 'gate.metric' "
                "to a metric the evaluate stage reports"
            )
        score = float(values[metric])
        if math.isnan(score):
            raise RegistryError(
                f"{owner} metric '{variant}.{name}.{metric}' is NaN; check the evaluate stage "
                "output for users or items that were left without scores"
            )
        scores[name] = score
    return scores


def _champion_score(metrics: dict[str, Any], variant: str, metric: str) -> float | None:
    value = metrics.get(variant, {}).get(TWO_STAGE, {}).get(metric)
    return None if value is None else float(value)


def _set_labels(model: bentoml.Model, updates: dict[str, str]) -> bentoml.Model:
    """Update labels of a stored model by rewriting its model.yaml.

    NOTE: BentoML 1.4 has no public call to change the labels of a stored model. This edits
    the ``labels`` mapping of model.yaml, the file BentoML reads the model info from.
    """
    info_file = Path(model.path) / "model.yaml"
    with info_file.open(encoding="utf-8") as handle:
        info = yaml.safe_load(handle)
    info["labels"] = {**(info.get("labels") or {}), **updates}

    tmp_file = info_file.with_suffix(".yaml.tmp")
    with tmp_file.open("w", encoding="utf-8") as handle:
        yaml.safe_dump(info, handle, sort_keys=False)
    os.replace(tmp_file, info_file)
    return bentoml.models.get(model.tag)


def _to_bentoml_metadata(value: Any) -> Any:
    """Convert a value to what BentoML metadata accepts: it rejects None and Path values.

    Mapping keys whose value is None are left out, so readers get None from ``.get``. None
    inside a list becomes the string "null".
    """
    if isinstance(value, dict):
        return {str(k): _to_bentoml_metadata(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return ["null" if v is None else _to_bentoml_metadata(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_metrics(metrics_file: Path) -> dict[str, Any]:
    """Read reports/metrics.json."""
    if not metrics_file.exists():
        raise RegistryError(
            f"metrics file {metrics_file} not found; run the evaluate stage ('dvc repro') first"
        )
    with metrics_file.open(encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise RegistryError(
                f"metrics file {metrics_file} is not valid JSON ({error}); rerun the evaluate "
                "stage with 'dvc repro --force evaluate'"
            ) from error
