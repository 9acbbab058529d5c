"""The ``shoprec evaluate`` and ``shoprec train`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from shoprec.cli_train import register

METRICS = {
    "all": {
        "two_stage": {"ndcg@10": 0.1523, "recall@20": 0.31},
        "buy_again": {"ndcg@10": 0.1377, "recall@20": 0.25},
    },
    "new": {
        "two_stage": {"ndcg@10": 0.0412, "recall@20": 0.09, "novelty@10": 9.25},
        "als": {"ndcg@10": 0.0301, "recall@20": 0.07, "novelty@10": 8.5},
    },
    "candidate_recall": {"all": 0.4321, "new": 0.2109, "n_candidates": 200},
    "n_users": {"all": 1234, "new": 987},
}


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_evaluate_prints_tables_and_report_path(tmp_path: Path) -> None:
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps(METRICS))
    page = tmp_path / "index.html"
    page.write_text("<html></html>")

    result = CliRunner().invoke(
        make_app(),
        ["evaluate", "--metrics-file", str(metrics_file), "--report", str(page)],
        env={"COLUMNS": "200"},
    )

    assert result.exit_code == 0, result.output
    assert "variant all (1234 users)" in result.output
    assert "variant new (987 users)" in result.output
    assert "0.1523" in result.output
    assert "novelty@10" in result.output
    assert "candidate recall at 200 candidates: all=0.4321, new=0.2109" in result.output
    assert f"report: {page}" in result.output


def test_evaluate_fails_without_metrics(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        make_app(), ["evaluate", "--metrics-file", str(tmp_path / "absent.json")]
    )

    assert result.exit_code == 1
    assert "run the evaluate stage" in str(result.exception)


def test_train_rejects_project_without_flow(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        make_app(), ["train", "--project-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )

    assert result.exit_code == 2
    assert "flows/train.py not found" in result.output


@pytest.mark.parametrize(
    ("command", "help_texts"),
    [
        ("train", ["Project root containing params.yaml", "Rerun every DVC stage"]),
        ("evaluate", ["Metrics JSON written by the evaluate stage", "Evaluation report page"]),
    ],
)
def test_options_have_help(command: str, help_texts: list[str]) -> None:
    result = CliRunner().invoke(make_app(), [command, "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for text in help_texts:
        assert text in result.output
