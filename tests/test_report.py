"""Evaluation report page and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from shoprec.report import ReportError, best_baseline, metrics_table, write_evaluation_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metrics() -> dict[str, Any]:
    scores = {
        "two_stage": {"precision@10": 0.061, "ndcg@10": 0.1523, "coverage@10": 0.2},
        "popularity": {"precision@10": 0.021, "ndcg@10": 0.0412, "coverage@10": 0.01},
        "buy_again": {"precision@10": 0.055, "ndcg@10": 0.1377, "coverage@10": 0.3},
        "als": {"precision@10": 0.031, "ndcg@10": 0.0801, "coverage@10": 0.4},
    }
    new_scores = {name: {**values, "novelty@10": 9.5} for name, values in scores.items()}
    new_scores["als"]["ndcg@10"] = 0.0999  # best baseline of variant new
    new_scores["buy_again"]["ndcg@10"] = 0.0
    return {
        "all": scores,
        "new": new_scores,
        "candidate_recall": {"all": 0.4321, "new": 0.2109, "n_candidates": 200},
        "ranker": {"share_queries_without_positive": 0.37, "best_iteration": 41},
        "n_users": {"all": 1234, "new": 987},
    }


@pytest.fixture
def recall_curve() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": ["all", "all", "new", "new"],
            "n_candidates": [50, 200, 50, 200],
            "recall": [0.3, 0.4321, 0.1, 0.2109],
        }
    )


@pytest.fixture
def importance() -> pd.DataFrame:
    return pd.DataFrame({"feature": ["als_score", "item_popularity_30d"], "gain": [812.5, 97.0]})


def test_report_writes_page_and_three_pngs(
    tmp_path: Path, metrics: dict[str, Any], recall_curve: pd.DataFrame, importance: pd.DataFrame
) -> None:
    page = write_evaluation_report(metrics, recall_curve, importance, tmp_path / "evaluation")

    assert page == tmp_path / "evaluation" / "index.html"
    for name in ("metrics_by_model.png", "candidate_recall.png", "feature_importance.png"):
        png = tmp_path / "evaluation" / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        assert f'src="{name}"' in page.read_text()


def test_report_table_lists_models_and_values(
    tmp_path: Path, metrics: dict[str, Any], recall_curve: pd.DataFrame, importance: pd.DataFrame
) -> None:
    html = write_evaluation_report(metrics, recall_curve, importance, tmp_path).read_text()

    assert '<tr class="two-stage"><td>two_stage</td><td>0.0610</td><td>0.1523</td>' in html
    assert '<tr class="best-baseline"><td>buy_again</td><td>0.0550</td><td>0.1377</td>' in html
    assert '<tr class="best-baseline"><td>als</td>' in html
    assert "<td>popularity</td><td>0.0210</td><td>0.0412</td>" in html
    assert "<th>novelty@10</th>" in html
    assert "Variant all (1234 users evaluated)" in html
    assert "<tr><td>new</td><td>0.2109</td></tr>" in html
    assert "among the 200 candidates" in html
    assert "<li>best_iteration: 41</li>" in html


def test_metrics_table_puts_two_stage_first(metrics: dict[str, Any]) -> None:
    table = metrics_table(metrics["all"])

    assert list(table.index) == ["two_stage", "als", "buy_again", "popularity"]
    assert table.loc["als", "ndcg@10"] == 0.0801


def test_best_baseline_ignores_two_stage(metrics: dict[str, Any]) -> None:
    assert best_baseline(metrics_table(metrics["all"])) == "buy_again"
    assert best_baseline(metrics_table(metrics["new"])) == "als"


def test_report_accepts_empty_importance(
    tmp_path: Path, metrics: dict[str, Any], recall_curve: pd.DataFrame
) -> None:
    empty = pd.DataFrame({"feature": [], "gain": []})

    page = write_evaluation_report(metrics, recall_curve, empty, tmp_path)

    assert "Feature importance (0 features, gain)" in page.read_text()
    assert (tmp_path / "feature_importance.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_rejects_recall_curve_without_columns(
    tmp_path: Path, metrics: dict[str, Any], importance: pd.DataFrame
) -> None:
    curve = pd.DataFrame({"variant": ["all"], "k": [10], "recall": [0.1]})

    with pytest.raises(ReportError, match=r"recall_curve is missing columns \['n_candidates'\]"):
        write_evaluation_report(metrics, curve, importance, tmp_path)


def test_report_rejects_metrics_without_variants(
    tmp_path: Path, recall_curve: pd.DataFrame, importance: pd.DataFrame
) -> None:
    with pytest.raises(ReportError, match=r"metrics contain none of the variants"):
        write_evaluation_report({"ranker": {}}, recall_curve, importance, tmp_path)
