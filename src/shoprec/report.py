"""Evaluation report: one HTML page with the metric tables and three PNG plots.

The page compares every model in both evaluation variants, with the two-stage row and the best
baseline highlighted, and shows the candidate recall curve and the ranker's feature importance.
"""

from __future__ import annotations

import html
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

TWO_STAGE = "two_stage"
VARIANTS = ("all", "new")
HIGHLIGHT_METRIC = "ndcg@10"
METRICS_PLOT_FILE = "metrics_by_model.png"
RECALL_PLOT_FILE = "candidate_recall.png"
IMPORTANCE_PLOT_FILE = "feature_importance.png"
MAX_FEATURES_PLOTTED = 30
# Left out of the metrics bar chart: coverage is a catalogue share and novelty is in bits, so
# neither is on the per-user accuracy scale of the other metrics. The tables show them.
_OTHER_SCALE_METRICS = ("coverage", "novelty")

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.two-stage { background: #dff0d8; font-weight: bold; }
tr.best-baseline { background: #fcf8e3; }
img { max-width: 100%; margin-bottom: 1.5em; }
.note { color: #555; font-size: 0.9em; }
"""


class ReportError(ShoprecError):
    """The inputs of a report do not have the expected layout."""


def write_evaluation_report(
    metrics: dict[str, Any],
    recall_curve: pd.DataFrame,
    importance: pd.DataFrame,
    out_dir: Path,
) -> Path:
    """Write index.html and its PNG plots into ``out_dir`` and return the page path.

    ``metrics`` has the layout of reports/metrics.json, ``recall_curve`` the columns
    variant, n_candidates, recall, and ``importance`` the columns feature, gain.
    """
    _require_columns(recall_curve, ("variant", "n_candidates", "recall"), "recall_curve")
    _require_columns(importance, ("feature", "gain"), "importance")
    variants = [v for v in VARIANTS if v in metrics]
    if not variants:
        raise ReportError(
            f"metrics contain none of the variants {VARIANTS}; got keys {sorted(metrics)}. "
            "Pass the content of reports/metrics.json"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    tables = {variant: metrics_table(metrics[variant]) for variant in variants}
    _plot_metrics(tables, out_dir / METRICS_PLOT_FILE)
    _plot_recall_curve(
        recall_curve, metrics.get("candidate_recall", {}), out_dir / RECALL_PLOT_FILE
    )
    _plot_importance(importance, out_dir / IMPORTANCE_PLOT_FILE)

    page = out_dir / "index.html"
    page.write_text(_render_page(metrics, tables, importance), encoding="utf-8")
    logger.info("wrote evaluation report %s", page)
    return page


def metrics_table(variant_metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Turn one variant of metrics.json into a models x metrics table, two-stage first."""
    table = pd.DataFrame.from_dict(variant_metrics, orient="index")
    order = [TWO_STAGE] + sorted(name for name in table.index if name != TWO_STAGE)
    table = table.reindex([name for name in order if name in table.index])
    table.index.name = "model"
    return table


def best_baseline(table: pd.DataFrame, metric: str = HIGHLIGHT_METRIC) -> str | None:
    """Return the baseline with the highest ``metric``, or None when there is none."""
    baselines = table.drop(index=TWO_STAGE, errors="ignore")
    if baselines.empty or metric not in baselines.columns:
        return None
    return str(baselines[metric].astype(float).idxmax())


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(
            f"{name} is missing columns {missing}; expected {list(columns)}, "
            f"got {list(frame.columns)}"
        )


def _render_page(
    metrics: dict[str, Any], tables: dict[str, pd.DataFrame], importance: pd.DataFrame
) -> str:
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>shoprec evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>shoprec evaluation</h1>",
        f'<p class="note">Written {created}. Green row: two-stage model. '
        f"Yellow row: best baseline by {HIGHLIGHT_METRIC}.</p>",
    ]

    n_users = metrics.get("n_users", {})
    for variant, table in tables.items():
        users = n_users.get(variant)
        users_text = f" ({users} users evaluated)" if users is not None else ""
        parts.append(f"<h2>Variant {html.escape(variant)}{users_text}</h2>")
        parts.append(_render_table(table))

    parts.append("<h2>Candidate recall</h2>")
    parts.append(_render_candidate_recall(metrics.get("candidate_recall", {})))
    parts.append(f'<img src="{RECALL_PLOT_FILE}" alt="candidate recall by number of candidates">')

    ranker = metrics.get("ranker", {})
    if ranker:
        parts.append("<h2>Ranker</h2><ul>")
        for key, value in ranker.items():
            parts.append(f"<li>{html.escape(str(key))}: {_format_value(value)}</li>")
        parts.append("</ul>")

    parts.append("<h2>Metrics by model</h2>")
    parts.append(f'<img src="{METRICS_PLOT_FILE}" alt="metrics by model and variant">')
    parts.append(f"<h2>Feature importance ({len(importance)} features, gain)</h2>")
    parts.append(f'<img src="{IMPORTANCE_PLOT_FILE}" alt="feature importance by gain">')
    parts.append("</body></html>")
    return "\n".join(parts)


def _render_table(table: pd.DataFrame) -> str:
    best = best_baseline(table)
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["model", *table.columns])
    rows = [f"<table><thead><tr>{header}</tr></thead><tbody>"]
    for name, values in table.iterrows():
        css = ""
        if name == TWO_STAGE:
            css = ' class="two-stage"'
        elif name == best:
            css = ' class="best-baseline"'
        cells = "".join(f"<td>{_format_value(v)}</td>" for v in values)
        rows.append(f"<tr{css}><td>{html.escape(str(name))}</td>{cells}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _render_candidate_recall(candidate_recall: dict[str, Any]) -> str:
    if not candidate_recall:
        return '<p class="note">metrics.json has no candidate_recall entry.</p>'
    n_candidates = candidate_recall.get("n_candidates", "?")
    cells = [
        f"<tr><td>{html.escape(variant)}</td><td>{_format_value(candidate_recall[variant])}</td></tr>"
        for variant in VARIANTS
        if variant in candidate_recall
    ]
    return (
        f"<p>Share of relevant items found among the {_format_value(n_candidates)} candidates "
        "per user, before ranking.</p>"
        "<table><thead><tr><th>variant</th><th>recall</th></tr></thead><tbody>"
        + "".join(cells)
        + "</tbody></table>"
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _pyplot() -> ModuleType:
    """Import pyplot on the Agg backend, so plots never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metrics(tables: dict[str, pd.DataFrame], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 4.5), squeeze=False)
    for ax, (variant, table) in zip(axes[0], tables.items(), strict=True):
        accuracy_columns = [c for c in table.columns if not c.startswith(_OTHER_SCALE_METRICS)]
        table[accuracy_columns].astype(float).plot.bar(ax=ax, rot=30)
        ax.set_title(f"variant {variant}")
        ax.set_xlabel("")
        ax.set_ylabel("score")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_recall_curve(
    recall_curve: pd.DataFrame, candidate_recall: dict[str, Any], path: Path
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, curve in recall_curve.groupby("variant", sort=True):
        curve = curve.sort_values("n_candidates")
        ax.plot(curve["n_candidates"], curve["recall"], marker="o", label=f"variant {variant}")
    if "n_candidates" in candidate_recall:
        ax.axvline(
            candidate_recall["n_candidates"],
            color="grey",
            linestyle="--",
            label="n_candidates used",
        )
    if recall_curve.empty:
        ax.text(0.5, 0.5, "no recall curve", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("candidates per user")
    ax.set_ylabel("recall of relevant items")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_importance(importance: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
    top = importance.sort_values("gain", ascending=False).head(MAX_FEATURES_PLOTTED)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(top) + 1)))
    if top.empty:
        ax.text(0.5, 0.5, "no feature importance", ha="center", va="center")
    else:
        ax.barh(top["feature"].astype(str)[::-1], top["gain"].astype(float)[::-1])
    ax.set_xlabel("total gain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
