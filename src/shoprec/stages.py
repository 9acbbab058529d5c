"""DVC stage entry points: read the event store and params.yaml, run a stage, write its files.

Data flow: candidates -> features -> rank -> evaluate. Each stage works on two folds. The
``train`` fold (history before split.fit_end, labels from [fit_end, train_end)) trains the
ranker. The ``test`` fold (history before split.train_end, targets from [train_end, test_end))
is only scored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pandas as pd
import typer

from shoprec.columns import CatalogueColumns, Columns
from shoprec.config import Settings, load_params, params_section
from shoprec.exceptions import ConfigError

if TYPE_CHECKING:
    from shoprec.candidates import CandidateModel
    from shoprec.features import FeaturesConfig

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("candidates", "features", "rank", "evaluate")
FOLDS: tuple[str, ...] = ("train", "test")


def _read_purchases(data_dir: Path) -> pd.DataFrame:
    from shoprec.interactions import clean_purchases
    from shoprec.store import read_events

    return clean_purchases(read_events(data_dir))


def _split(params: dict[str, Any], purchases: pd.DataFrame):
    from shoprec.interactions import SplitConfig, make_folds, resolve_split

    split = resolve_split(
        SplitConfig(**params_section(params, "split")), purchases[Columns.TS].max()
    )
    return split, make_folds(split)


def _window(purchases: pd.DataFrame, fold) -> tuple[pd.DataFrame, pd.DataFrame]:
    from shoprec.interactions import slice_window

    return slice_window(purchases, None, fold.cutoff), slice_window(
        purchases, fold.cutoff, fold.target_end
    )


def run_candidates(
    params: dict[str, Any], data_dir: Path, artifacts_dir: Path, task_runner: str = "thread"
) -> None:
    """Fit a candidate model per fold and write the candidates of the evaluated users.

    Candidates are generated in ``candidates.n_shards`` user shards on `task_runner`.
    """
    from shoprec.bundle import save_candidate_model
    from shoprec.candidates import CandidatesConfig, fit_candidate_model, generate_candidates
    from shoprec.interactions import build_targets
    from shoprec.shards import rows_of_users, run_fold_shards, split_users

    config = CandidatesConfig(**params_section(params, "candidates"))
    purchases = _read_purchases(data_dir)
    split, folds = _split(params, purchases)
    out = artifacts_dir / "candidates"
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(split.model_dump_json(indent=2), encoding="utf-8")

    models: dict[str, CandidateModel] = {}
    shards: dict[str, list[dict[str, Any]]] = {}
    for name, fold in folds.items():
        history, target = _window(purchases, fold)
        models[name] = fit_candidate_model(history, fold.cutoff, config)
        users = build_targets(history, target, "all")[Columns.USER_ID].unique()
        shards[name] = [
            {"model": models[name], "history": rows_of_users(history, part), "user_ids": part}
            for part in split_users(users, config.n_shards)
        ]

    candidates = run_fold_shards("candidates", generate_candidates, shards, task_runner)
    for name, model in models.items():
        save_candidate_model(model, out / name / "model")
        candidates[name].to_parquet(out / name / "candidates.parquet", index=False)
        logger.info(
            "candidates of fold %s: %d rows for %d users",
            name,
            len(candidates[name]),
            candidates[name][Columns.USER_ID].nunique(),
        )


def build_shard_features(
    candidates: pd.DataFrame,
    history: pd.DataFrame,
    model: CandidateModel,
    item_table: pd.DataFrame,
    now: pd.Timestamp,
    config: FeaturesConfig,
) -> pd.DataFrame:
    """Score the users of `candidates` and build the features of their candidate rows."""
    from shoprec.candidates import score_users
    from shoprec.features import build_features

    scores = score_users(model, history, pd.Index(candidates[Columns.USER_ID].unique()))
    return build_features(candidates, history, scores, model, item_table, now, config)


def run_features(
    params: dict[str, Any], data_dir: Path, artifacts_dir: Path, task_runner: str = "thread"
) -> None:
    """Build labelled features of every candidate of both folds.

    Features are built in ``features.n_shards`` user shards on `task_runner`.
    """
    from shoprec.bundle import load_candidate_model
    from shoprec.features import FeaturesConfig, attach_labels, build_item_table
    from shoprec.shards import rows_of_users, run_fold_shards, split_users

    config = FeaturesConfig(**params_section(params, "features"))
    purchases = _read_purchases(data_dir)
    _, folds = _split(params, purchases)
    out = artifacts_dir / "features"
    out.mkdir(parents=True, exist_ok=True)

    targets: dict[str, pd.DataFrame] = {}
    item_tables: dict[str, pd.DataFrame] = {}
    shards: dict[str, list[dict[str, Any]]] = {}
    for name, fold in folds.items():
        history, targets[name] = _window(purchases, fold)
        model = load_candidate_model(artifacts_dir / "candidates" / name / "model")
        candidates = pd.read_parquet(artifacts_dir / "candidates" / name / "candidates.parquet")
        item_tables[name] = build_item_table(history, fold.cutoff, config)

        # Shards follow the sorted user order of candidates.parquet, so the concatenated rows
        # keep the file's order.
        shards[name] = [
            {
                "candidates": rows_of_users(candidates, part),
                "history": rows_of_users(history, part),
                "model": model,
                "item_table": item_tables[name],
                "now": fold.cutoff,
                "config": config,
            }
            for part in split_users(candidates[Columns.USER_ID], config.n_shards)
        ]

    features = run_fold_shards("features", build_shard_features, shards, task_runner)
    for name, frame in features.items():
        attach_labels(frame, targets[name]).to_parquet(out / f"{name}.parquet", index=False)
        item_tables[name].to_parquet(out / f"{name}_items.parquet")


def run_rank(
    params: dict[str, Any],
    data_dir: Path,
    artifacts_dir: Path,
    reports_dir: Path,
    key_check: str | None = None,
) -> None:
    """Train one ranker per variant on the train fold and save the model bundle.

    `key_check` (``Pseudonymizer.key_check()`` of the ingestion key) goes into the bundle's
    metadata, so serving can warn when it runs with another key.
    """
    from shoprec.bundle import ModelBundle, load_candidate_model
    from shoprec.features import FeaturesConfig
    from shoprec.interactions import VARIANTS
    from shoprec.rank import RankConfig, feature_importance, train_ranker
    from shoprec.store import read_catalogue

    config = RankConfig(**params_section(params, "rank"))
    features = pd.read_parquet(artifacts_dir / "features" / "train.parquet")
    rankers = {}
    for variant in VARIANTS:
        rows = features if variant == "all" else features[features["from_past"] == 0]
        rankers[variant] = train_ranker(rows, config)

    purchases = _read_purchases(data_dir)
    _, folds = _split(params, purchases)
    cutoff = folds["test"].cutoff
    model = load_candidate_model(artifacts_dir / "candidates" / "test" / "model")
    catalogue = read_catalogue(data_dir)
    catalogue = catalogue[catalogue[CatalogueColumns.ITEM_ID].astype(str).isin(model.items.ids)]
    bundle = ModelBundle(
        candidate_model=model,
        item_table=pd.read_parquet(artifacts_dir / "features" / "test_items.parquet"),
        rankers=rankers,
        features_config=FeaturesConfig(**params_section(params, "features")),
        purchases=purchases[purchases[Columns.TS] < cutoff],
        catalogue=catalogue.reset_index(drop=True),
        metadata={
            "training_window": {"start": str(purchases[Columns.TS].min()), "end": str(cutoff)},
            "ranker_label_window": {
                "start": str(folds["train"].cutoff),
                "end": str(folds["train"].target_end),
            },
            "params": {s: params.get(s) for s in ("split", "candidates", "features", "rank")},
            "pseudonym_key_check": key_check,
        },
    )
    bundle.save(artifacts_dir / "model")

    evaluation_dir = reports_dir / "evaluation"
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    feature_importance(rankers["all"]).to_csv(evaluation_dir / "importance.csv", index=False)
    feature_importance(rankers["new"]).to_csv(evaluation_dir / "importance_new.csv", index=False)


def run_evaluate(
    params: dict[str, Any], data_dir: Path, artifacts_dir: Path, reports_dir: Path
) -> dict[str, Any]:
    """Score the two-stage model and every baseline on the test fold; write metrics.json."""
    from shoprec.bundle import ModelBundle
    from shoprec.candidates import score_users
    from shoprec.evaluate import EvaluateConfig, evaluate_test_fold

    config = EvaluateConfig(**params_section(params, "evaluate"))
    bundle = ModelBundle.load(artifacts_dir / "model")
    purchases = _read_purchases(data_dir)
    _, folds = _split(params, purchases)
    history, target = _window(purchases, folds["test"])
    features = pd.read_parquet(artifacts_dir / "features" / "test.parquet")
    scores = score_users(
        bundle.candidate_model, history, pd.Index(features[Columns.USER_ID].unique())
    )

    metrics, curve = evaluate_test_fold(
        features, history, target, scores, bundle, folds["test"].cutoff, config
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    evaluation_dir = reports_dir / "evaluation"
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    curve.to_csv(evaluation_dir / "recall_curve.csv", index=False)

    from shoprec.report import write_evaluation_report

    importance = pd.read_csv(evaluation_dir / "importance.csv")
    write_evaluation_report(metrics, curve, importance, evaluation_dir)
    return metrics


def _key_check(settings: Settings) -> str | None:
    """Return the check value of the configured pseudonym key, or None when there is none."""
    from shoprec.privacy import Pseudonymizer, load_or_create_key

    secret = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None
    if secret is None and not settings.key_file.exists():
        return None
    return Pseudonymizer(load_or_create_key(secret, settings.key_file)).key_check()


def run_stage(name: str, settings: Settings | None = None) -> float:
    """Run one stage by name with settings from the environment; return seconds taken."""
    settings = settings or Settings()
    params = load_params(settings.params_file)
    runners: dict[str, Callable[[], Any]] = {
        "candidates": lambda: run_candidates(
            params, settings.data_dir, settings.artifacts_dir, settings.task_runner
        ),
        "features": lambda: run_features(
            params, settings.data_dir, settings.artifacts_dir, settings.task_runner
        ),
        "rank": lambda: run_rank(
            params,
            settings.data_dir,
            settings.artifacts_dir,
            settings.reports_dir,
            _key_check(settings),
        ),
        "evaluate": lambda: run_evaluate(
            params, settings.data_dir, settings.artifacts_dir, settings.reports_dir
        ),
    }
    if name not in runners:
        raise ConfigError(f"unknown stage {name!r}; expected one of {list(STAGES)}")
    # implicit and LightGBM manage their own threads; BLAS stays single-threaded.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    started = time.perf_counter()
    runners[name]()
    elapsed = time.perf_counter() - started
    logger.info("stage %s finished in %.1fs", name, elapsed)
    return elapsed


def stage_command(
    name: Annotated[
        str, typer.Argument(help="Stage to run: candidates, features, rank or evaluate.")
    ],
) -> None:
    """Run one DVC stage of the training pipeline (paths from SHOPREC_* settings)."""
    run_stage(name)


def register(app: typer.Typer) -> None:
    """Add ``shoprec stage NAME`` to the shoprec CLI."""
    app.command("stage")(stage_command)


def main() -> None:
    """Run ``python -m shoprec.stages NAME`` (the command dvc.yaml calls)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    typer.run(stage_command)


if __name__ == "__main__":
    main()
