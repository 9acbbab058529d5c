"""The trained two-stage model as one object that serving loads and calls.

``recommend`` runs the same candidate and feature code as training (candidates.py,
features.py), for one user's events.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shoprec.candidates import (
    CandidateModel,
    CandidatesConfig,
    generate_candidates,
    score_users,
)
from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError
from shoprec.features import FeaturesConfig, build_features
from shoprec.interactions import IdMap, clean_purchases
from shoprec.rank import FeatureSpec, Ranker, predict_scores

logger = logging.getLogger(__name__)

ANONYMOUS_USER = "__anonymous__"
RESULT_COLUMNS = [Columns.ITEM_ID, Columns.SCORE, Columns.RANK, Columns.SOURCE]


class BundleError(ShoprecError):
    """A model bundle is missing, incomplete or asked for something it cannot do."""


class UnknownItemError(BundleError):
    """An item id is not in the model's catalogue."""


# Columns of the training purchases kept in the bundle for known users' history.
HISTORY_COLUMNS = [
    Columns.USER_ID,
    Columns.ITEM_ID,
    Columns.EVENT_TYPE,
    Columns.QUANTITY,
    Columns.PRICE,
    Columns.TS,
    Columns.ORDER_ID,
    Columns.COUNTRY,
]


def save_candidate_model(model: CandidateModel, directory: Path) -> Path:
    """Write a fitted candidate model as npz, parquet and JSON files."""
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / "als.npz",
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        user_ids=model.users.ids.to_numpy(dtype=str),
        item_ids=model.items.ids.to_numpy(dtype=str),
    )
    sp.save_npz(directory / "copurchase.npz", model.copurchase)
    sp.save_npz(directory / "knn.npz", model.knn)
    model.popular.rename("users").to_frame().to_parquet(directory / "popular.parquet")
    info = {"cutoff": model.cutoff.isoformat(), "config": model.config.model_dump()}
    (directory / "candidate_model.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return directory


def load_candidate_model(directory: Path) -> CandidateModel:
    """Read a candidate model written by ``save_candidate_model``."""
    info_file = directory / "candidate_model.json"
    if not info_file.exists():
        raise BundleError(f"{info_file} not found; run the candidates stage (dvc repro candidates)")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    arrays = np.load(directory / "als.npz", allow_pickle=False)
    return CandidateModel(
        users=IdMap(pd.Index(arrays["user_ids"].astype(str))),
        items=IdMap(pd.Index(arrays["item_ids"].astype(str))),
        user_factors=arrays["user_factors"],
        item_factors=arrays["item_factors"],
        copurchase=sp.load_npz(directory / "copurchase.npz").tocsr(),
        knn=sp.load_npz(directory / "knn.npz").tocsr(),
        popular=pd.read_parquet(directory / "popular.parquet")["users"],
        cutoff=pd.Timestamp(info["cutoff"]),
        config=CandidatesConfig(**info["config"]),
    )


@dataclass
class ModelBundle:
    """The two-stage model: candidate model, item table, rankers per variant and metadata.

    ``purchases`` contains the training purchases, so a known user's history is complete even
    when the caller passes only their newest events. ``catalogue`` has the item catalogue
    columns (item_id, description, last_price, first_seen, last_seen) of the model's items.
    """

    candidate_model: CandidateModel
    item_table: pd.DataFrame
    rankers: dict[str, Ranker]
    features_config: FeaturesConfig
    purchases: pd.DataFrame
    catalogue: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    _rows_by_user: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)

    def save(self, directory: Path) -> Path:
        """Write the bundle as plain files (npz, parquet, LightGBM text, JSON) to ``directory``."""
        save_candidate_model(self.candidate_model, directory)
        self.item_table.to_parquet(directory / "item_table.parquet")
        self.purchases[HISTORY_COLUMNS].to_parquet(directory / "purchases.parquet", index=False)
        self.catalogue.to_parquet(directory / "catalogue.parquet", index=False)
        for variant, ranker in self.rankers.items():
            for member, booster in enumerate(ranker.boosters):
                booster.save_model(str(directory / f"ranker_{variant}_{member}.txt"))
        spec = {
            "features": self.features_config.model_dump(),
            "rankers": {
                variant: {
                    "spec": ranker.spec.to_dict(),
                    "n_models": len(ranker.boosters),
                    "best_iteration": ranker.best_iteration,
                    "share_queries_without_positive": ranker.share_queries_without_positive,
                }
                for variant, ranker in self.rankers.items()
            },
        }
        (directory / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
        (directory / "metadata.json").write_text(
            json.dumps(self.metadata, indent=2, default=str), encoding="utf-8"
        )
        logger.info("model bundle saved to %s", directory)
        return directory

    @classmethod
    def load(cls, directory: Path) -> ModelBundle:
        """Read a bundle written by ``save``."""
        spec_file = directory / "spec.json"
        if not spec_file.exists():
            raise BundleError(
                f"{spec_file} not found; train a model first (dvc repro rank) or fix the path"
            )
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        rankers = {
            variant: Ranker(
                boosters=[
                    lgb.Booster(model_file=str(directory / f"ranker_{variant}_{member}.txt"))
                    for member in range(info["n_models"])
                ],
                spec=FeatureSpec.from_dict(info["spec"]),
                best_iteration=info["best_iteration"],
                share_queries_without_positive=info["share_queries_without_positive"],
            )
            for variant, info in spec["rankers"].items()
        }
        return cls(
            candidate_model=load_candidate_model(directory),
            item_table=pd.read_parquet(directory / "item_table.parquet"),
            rankers=rankers,
            features_config=FeaturesConfig(**spec["features"]),
            purchases=pd.read_parquet(directory / "purchases.parquet"),
            catalogue=pd.read_parquet(directory / "catalogue.parquet"),
            metadata=json.loads((directory / "metadata.json").read_text(encoding="utf-8")),
        )

    def recommend(
        self,
        user_history: pd.DataFrame,
        k: int,
        context_items: list[str] | None = None,
        exclude_items: set[str] | None = None,
        exclude_purchased: bool = False,
        now: pd.Timestamp | None = None,
        user_id: str | None = None,
    ) -> pd.DataFrame:
        """Rank items for one user from their canonical events.

        With ``user_id`` the user's training purchases are added to ``user_history``.
        ``context_items`` (e.g. the current cart) count as a purchase made at ``now``.
        ``now`` defaults to the later of the training cutoff and the user's last event.
        Users without any purchase or context get the recent popular items.
        """
        if k <= 0:
            raise BundleError(f"k must be positive, got {k}")
        # Context items are already in the cart, so they are never recommended back.
        exclude = set(exclude_items or ()) | {str(item) for item in context_items or ()}
        purchases = self._purchases(user_history, context_items or [], now, user_id)
        if now is None:
            latest = purchases[Columns.TS].max() if not purchases.empty else None
            now = max(self.candidate_model.cutoff, latest) if latest is not None else None
            now = now or self.candidate_model.cutoff
        if purchases.empty:
            return self._popular(k, exclude)

        variant = "new" if exclude_purchased else "all"
        user_ids = pd.Index(purchases[Columns.USER_ID].unique()[:1])
        scores = score_users(self.candidate_model, purchases, user_ids)
        candidates = generate_candidates(self.candidate_model, purchases, user_ids, scores)
        if exclude_purchased:
            candidates = candidates[~candidates["from_past"]]
        candidates = candidates[~candidates[Columns.ITEM_ID].isin(exclude)]
        if candidates.empty:
            return self._popular(k, exclude | set(purchases[Columns.ITEM_ID]))

        features = build_features(
            candidates,
            purchases,
            scores,
            self.candidate_model,
            self.item_table,
            now,
            self.features_config,
        )
        features[Columns.SCORE] = predict_scores(self.rankers[variant], features)
        ranked = features.sort_values(
            [Columns.SCORE, Columns.ITEM_ID], ascending=[False, True], kind="stable"
        ).head(k)
        result = ranked[[Columns.ITEM_ID, Columns.SCORE, Columns.SOURCE]].reset_index(drop=True)
        result[Columns.RANK] = np.arange(1, len(result) + 1)
        return result[RESULT_COLUMNS]

    def similar_items(self, item_id: str, k: int) -> pd.DataFrame:
        """Return items bought together with ``item_id``, then items with the same buyers."""
        model = self.candidate_model
        position = model.items.to_index([str(item_id)])[0]
        if position < 0:
            raise UnknownItemError(
                f"item {item_id!r} is not in the model catalogue ({len(model.items)} items); "
                "check the id or retrain after it has been sold"
            )
        parts = []
        for source, matrix in (("copurchase", model.copurchase), ("knn", model.knn)):
            row = matrix.getrow(position)
            parts.append(
                pd.DataFrame(
                    {
                        Columns.ITEM_ID: model.items.ids.to_numpy()[row.indices],
                        Columns.SCORE: row.data.astype(float),
                        Columns.SOURCE: source,
                    }
                ).sort_values([Columns.SCORE, Columns.ITEM_ID], ascending=[False, True])
            )
        combined = pd.concat(parts, ignore_index=True).drop_duplicates(Columns.ITEM_ID)
        return combined.head(k).reset_index(drop=True)

    def _purchases(
        self,
        user_history: pd.DataFrame,
        context_items: list[str],
        now: pd.Timestamp | None,
        user_id: str | None,
    ) -> pd.DataFrame:
        history = user_history.copy()
        if user_id is None and not history.empty:
            known = history[Columns.USER_ID].dropna() if Columns.USER_ID in history else []
            user_id = str(known.iloc[0]) if len(known) else None
        user_id = user_id if user_id is not None else ANONYMOUS_USER
        if not history.empty:
            history[Columns.USER_ID] = user_id
        stored = self._stored_purchases(user_id)
        if not stored.empty:
            history = pd.concat([stored, history], ignore_index=True).drop_duplicates(
                [Columns.ORDER_ID, Columns.ITEM_ID, Columns.TS, Columns.EVENT_TYPE]
            )
        purchases = (
            clean_purchases(history) if not history.empty else pd.DataFrame(columns=HISTORY_COLUMNS)
        )
        if not context_items:
            return purchases
        ts = now if now is not None else self.candidate_model.cutoff
        prices = self.item_table["item_price"].reindex(context_items).fillna(1.0).to_numpy()
        context = pd.DataFrame(
            {
                Columns.USER_ID: user_id,
                Columns.ITEM_ID: [str(item) for item in context_items],
                Columns.EVENT_TYPE: "purchase",
                Columns.QUANTITY: 1,
                Columns.PRICE: prices,
                Columns.TS: pd.Timestamp(ts),
                Columns.ORDER_ID: "context",
            }
        )
        if purchases.empty:
            return clean_purchases(context)
        return clean_purchases(pd.concat([purchases, context], ignore_index=True))

    def _stored_purchases(self, user_id: str) -> pd.DataFrame:
        if self._rows_by_user is None:
            self._rows_by_user = self.purchases.groupby(Columns.USER_ID, sort=False).indices
        rows = self._rows_by_user.get(user_id)
        return self.purchases.iloc[rows] if rows is not None else self.purchases.iloc[0:0]

    def _popular(self, k: int, exclude: set[str]) -> pd.DataFrame:
        popular = self.candidate_model.popular
        popular = popular[~popular.index.isin(exclude)].head(k)
        logger.debug("cold start: returning %d popular items", len(popular))
        return pd.DataFrame(
            {
                Columns.ITEM_ID: popular.index.astype(str),
                Columns.SCORE: popular.to_numpy(dtype=float),
                Columns.RANK: np.arange(1, len(popular) + 1),
                Columns.SOURCE: "popularity",
            }
        )[RESULT_COLUMNS]
