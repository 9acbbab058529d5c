"""The trained two-stage model as one object that serving loads and calls.

``recommend`` scores one user with the single-user paths of candidate generation
(user_candidates.py) and features (features.py), which tests check against the batch code that
training runs. Scores of users who have only training purchases are cached per bundle.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shoprec.candidates import CandidateModel, CandidatesConfig, FoldIn, popularity_scores
from shoprec.columns import EVENT_COLUMNS, Columns
from shoprec.exceptions import ShoprecError
from shoprec.features import FeaturesConfig, ItemLookup, build_user_features, feature_matrix
from shoprec.interactions import IdMap
from shoprec.lru import LruCache
from shoprec.rank import FeatureSpec, Ranker
from shoprec.user_candidates import generate_user_candidates, score_user
from shoprec.user_history import PurchaseIndex, UserHistory, context_purchases, new_purchases

logger = logging.getLogger(__name__)

ANONYMOUS_USER = "__anonymous__"
# Users whose scores are kept between requests (about 15 kB each).
SCORE_CACHE_USERS = 2048
# Scores of every training user's candidates (variant "all", at the cutoff), written by save().
PRECOMPUTED_FILE = "precomputed_scores.npz"
# Key of DataFrame.attrs telling whether recommend() reused cached ranker scores.
CACHE_HIT_ATTR = "score_cache_hit"
RESULT_COLUMNS = [Columns.ITEM_ID, Columns.SCORE, Columns.RANK, Columns.SOURCE]


class BundleError(ShoprecError):
    """A model bundle is missing, incomplete or asked for something it cannot do."""


class UnknownItemError(BundleError):
    """An item id is not in the model's catalogue."""


# Columns of the training purchases kept in the bundle for known users' history.
HISTORY_COLUMNS = [c for c in EVENT_COLUMNS if c not in (Columns.EVENT_ID, Columns.BATCH_ID)]


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


@dataclass(frozen=True)
class ScoredCandidates:
    """One user's candidates (sorted by item id) with ranker scores, NaN where not scored."""

    item_ids: np.ndarray
    source: np.ndarray
    score: np.ndarray

    def keep(self, exclude: AbstractSet[str]) -> np.ndarray:
        return np.array([item not in exclude for item in self.item_ids], dtype=bool)


def _fingerprint(history: UserHistory, stored_only: bool) -> tuple | None:
    """Return every row of ``history`` as one hashable key; None stands for the training rows."""
    if stored_only:
        return None
    return (
        tuple(history.item_ids.tolist()),
        tuple(history.order_ids.tolist()),
        history.ts.tobytes(),
        history.quantity.tobytes(),
        history.price.tobytes(),
    )


# Least recently used candidate scores, keyed by user, variant, time and history.
ScoreCache = LruCache[ScoredCandidates]


@dataclass(frozen=True)
class OnlineTables:
    """Lookups built once per loaded bundle so that one request touches only its user's rows."""

    purchases: PurchaseIndex
    items: ItemLookup
    popular: np.ndarray
    fold_in: FoldIn
    scores: ScoreCache
    # Read-only scores of training users, filled by precompute_scores() or load().
    precomputed: dict[str, ScoredCandidates]
    popular_ids: np.ndarray
    popular_counts: np.ndarray


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
    _online: OnlineTables | None = field(default=None, init=False, repr=False)

    def save(self, directory: Path, precompute: bool = True) -> Path:
        """Write the bundle as plain files (npz, parquet, LightGBM text, JSON) to ``directory``.

        With ``precompute``, the ranked candidates of every training user are scored first
        and saved too, so serving returns a known user's items without running the ranker.
        """
        save_candidate_model(self.candidate_model, directory)
        if precompute:
            self._save_precomputed(directory / PRECOMPUTED_FILE, self.precompute_scores())
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
        bundle = cls(
            candidate_model=load_candidate_model(directory),
            item_table=pd.read_parquet(directory / "item_table.parquet"),
            rankers=rankers,
            features_config=FeaturesConfig(**spec["features"]),
            purchases=pd.read_parquet(directory / "purchases.parquet"),
            catalogue=pd.read_parquet(directory / "catalogue.parquet"),
            metadata=json.loads((directory / "metadata.json").read_text(encoding="utf-8")),
        )
        online = bundle.prepare_online()
        if (directory / PRECOMPUTED_FILE).exists():
            online.precomputed.update(bundle._load_precomputed(directory / PRECOMPUTED_FILE))
        return bundle

    def precompute_scores(self) -> dict[str, ScoredCandidates]:
        """Score the candidates of every training user as ``recommend`` would, and keep them.

        The scores are those of the default variant (purchased items allowed) at the cutoff,
        which is what a user without online events or context gets, with nothing excluded.
        """
        online = self.prepare_online()
        users = online.purchases.users()
        cutoff = self.candidate_model.cutoff
        started = time.perf_counter()
        for done, user in enumerate(users, start=1):
            history = online.purchases.history(user)
            online.precomputed[user] = self._score(history, frozenset(), False, cutoff)
            if done % 1000 == 0 or done == len(users):
                logger.info(
                    "precomputed scores of %d/%d users in %.0fs",
                    done,
                    len(users),
                    time.perf_counter() - started,
                )
        return online.precomputed

    def _save_precomputed(self, path: Path, entries: dict[str, ScoredCandidates]) -> None:
        users = sorted(entries)
        parts = [entries[user] for user in users]
        sources, source_codes = np.unique(
            np.concatenate([part.source for part in parts]).astype(str), return_inverse=True
        )
        item_ids = np.concatenate([part.item_ids for part in parts]).astype(str)
        np.savez_compressed(
            path,
            users=np.array(users, dtype=str),
            lengths=np.array([len(part.item_ids) for part in parts], dtype=np.int64),
            items=self.candidate_model.items.to_index(item_ids).astype(np.int32),
            sources=sources,
            source_codes=source_codes.astype(np.int16),
            scores=np.concatenate([part.score for part in parts]),
        )

    def _load_precomputed(self, path: Path) -> dict[str, ScoredCandidates]:
        with np.load(path, allow_pickle=False) as data:
            ids = self.candidate_model.items.ids.to_numpy(dtype=object)
            items = ids[data["items"]]
            sources = data["sources"].astype(object)[data["source_codes"]]
            scores = data["scores"]
            ends = np.cumsum(data["lengths"])
            starts = ends - data["lengths"]
            return {
                str(user): ScoredCandidates(items[a:b], sources[a:b], scores[a:b])
                for user, a, b in zip(data["users"], starts, ends, strict=True)
            }

    def recommend(
        self,
        user_history: pd.DataFrame,
        k: int,
        context_items: list[str] | None = None,
        exclude_items: AbstractSet[str] | None = None,
        exclude_purchased: bool = False,
        now: pd.Timestamp | None = None,
        user_id: str | None = None,
    ) -> pd.DataFrame:
        """Rank items for one user from their canonical events.

        With ``user_id`` the user's training purchases are added to ``user_history``.
        ``context_items`` (e.g. the current cart) count as a purchase made at ``now``.
        ``now`` defaults to the later of the training cutoff and the user's last event.
        Users without any purchase or context get the recent popular items.
        A purchase event without an order id counts as an order of its own.
        """
        if k <= 0:
            raise BundleError(f"k must be positive, got {k}")
        context = [str(item) for item in context_items or ()]
        # Context items are already in the cart, so they are never recommended back.
        exclude: AbstractSet[str] = exclude_items if exclude_items is not None else frozenset()
        if context:
            exclude = set(exclude) | set(context)
        online = self.prepare_online()
        history, stored_only = self._user_history(user_history, context, now, user_id)
        if now is None:
            latest = pd.Timestamp(int(history.ts.max()), tz="UTC") if len(history) else None
            now = max(self.candidate_model.cutoff, latest) if latest is not None else None
            now = now or self.candidate_model.cutoff
        if len(history) == 0:
            return self._popular(k, exclude)

        # The same history always gets the same scores for the same `now`. A new online event
        # or another cart changes the history, hence the key, so no stale entry is ever read.
        key = (history.user_id, exclude_purchased, now.value, _fingerprint(history, stored_only))
        scored = online.scores.get(key)
        if scored is None and key[1:] == (False, self.candidate_model.cutoff.value, None):
            scored = online.precomputed.get(history.user_id)
        keep = scored.keep(exclude) if scored is not None else None
        cache_hit = scored is not None and not np.isnan(scored.score[keep]).any()
        if not cache_hit:
            scored = self._score(history, exclude, exclude_purchased, now)
            keep = scored.keep(exclude)
            online.scores.put(key, scored)
        if not keep.any():
            return self._popular(k, set(exclude) | set(history.item_ids.tolist()))

        rows = np.flatnonzero(keep)
        top = rows[np.lexsort((rows, -scored.score[rows]))[:k]]
        ranked = pd.DataFrame(
            {
                Columns.ITEM_ID: scored.item_ids[top],
                Columns.SCORE: scored.score[top],
                Columns.RANK: np.arange(1, len(top) + 1),
                Columns.SOURCE: scored.source[top],
            }
        )
        # Read by serving for its cache metrics; absent from popular-list results.
        ranked.attrs[CACHE_HIT_ATTR] = cache_hit
        return ranked

    def _score(
        self,
        history: UserHistory,
        exclude: AbstractSet[str],
        exclude_purchased: bool,
        now: pd.Timestamp,
    ) -> ScoredCandidates:
        """Generate the user's candidates and score those not in ``exclude`` (others get NaN)."""
        online = self.prepare_online()
        model = self.candidate_model
        columns = model.items.to_index(history.item_ids)
        scores = score_user(model, history, columns, online.fold_in)
        candidates = generate_user_candidates(model, history, scores, online.popular)
        if exclude_purchased:
            candidates = candidates.select(~candidates.from_past)
        score = np.full(len(candidates), np.nan)
        keep = np.array([item not in exclude for item in candidates.item_ids], dtype=bool)
        if keep.any():
            ranker = self.rankers["new" if exclude_purchased else "all"]
            features = build_user_features(
                candidates.select(keep), history, scores, online.items, now, self.features_config
            )
            matrix = feature_matrix(features, ranker.spec.features, ranker.spec.categories)
            score[keep] = np.mean([b.predict(matrix, num_threads=1) for b in ranker.boosters], 0)
        return ScoredCandidates(candidates.item_ids, candidates.source, score)

    def prepare_online(self) -> OnlineTables:
        """Build (once) the lookups that single-user scoring needs; ``load`` calls it."""
        if self._online is None:
            started = time.perf_counter()
            self._online = OnlineTables(
                purchases=PurchaseIndex(self.purchases),
                items=ItemLookup.from_table(self.item_table),
                popular=popularity_scores(self.candidate_model),
                fold_in=FoldIn(self.candidate_model.item_factors, self.candidate_model.config),
                scores=ScoreCache(SCORE_CACHE_USERS),
                precomputed={},
                popular_ids=self.candidate_model.popular.index.astype(str).to_numpy(dtype=object),
                popular_counts=self.candidate_model.popular.to_numpy(dtype=float),
            )
            logger.debug("online tables built in %.2fs", time.perf_counter() - started)
        return self._online

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

    def _user_history(
        self,
        user_history: pd.DataFrame,
        context_items: list[str],
        now: pd.Timestamp | None,
        user_id: str | None,
    ) -> tuple[UserHistory, bool]:
        """Return the user's training purchases, new purchases and context as clean purchases,
        and whether the training purchases are all there is."""
        if user_id is None and not user_history.empty and Columns.USER_ID in user_history:
            known = user_history[Columns.USER_ID].dropna()
            user_id = str(known.iloc[0]) if len(known) else None
        user_id = user_id if user_id is not None else ANONYMOUS_USER
        history = stored = self.prepare_online().purchases.history(user_id)
        if not user_history.empty:
            history = history.append(new_purchases(user_history, stored))
        if not context_items:
            return history, history is stored
        ts = now if now is not None else self.candidate_model.cutoff
        prices = self.item_table["item_price"].reindex(context_items).fillna(1.0).to_numpy()
        return history.append(context_purchases(context_items, prices, ts, user_id)), False

    def _popular(self, k: int, exclude: AbstractSet[str]) -> pd.DataFrame:
        online = self.prepare_online()
        # Walk the list in order and stop at k, so a large exclude set costs nothing extra.
        rows = []
        for row, item in enumerate(online.popular_ids):
            if len(rows) == k:
                break
            if item not in exclude:
                rows.append(row)
        logger.debug("cold start: returning %d popular items", len(rows))
        return pd.DataFrame(
            {
                Columns.ITEM_ID: online.popular_ids[rows],
                Columns.SCORE: online.popular_counts[rows],
                Columns.RANK: np.arange(1, len(rows) + 1),
                Columns.SOURCE: "popularity",
            }
        )[RESULT_COLUMNS]
