"""Day-by-day replay of the landing files after a cutoff: timeline, retrain rule and plots.

The replay flow (flows/replay.py) ingests one landing day at a time, monitors it and retrains
when the monitor decides so and this module's retrain budget allows it. For every day it records the
online quality of the model in force and of the initial champion, so the year can be read
with and without retraining. The functions here hold no I/O except the state, table and plot
writers at the end.
"""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
TIMELINE_COLUMNS: tuple[str, ...] = (
    "day",
    "model_tag",
    "n_rows",
    "n_users",
    "drift_share",
    "decision",
    "reasons",
    "quality",
    "quality_without_retraining",
    "hit_rate",
    "hit_rate_without_retraining",
    "retrained",
    "retrain_reason",
    "promoted",
)


class ReplayError(ShoprecError):
    """The replay cannot start or continue."""


class ReplayConfig(BaseModel):
    """The ``replay`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    cutoff: date = date(2011, 9, 30)
    end: date | None = None
    max_retrains: int = Field(default=3, ge=0)
    min_retrain_gap_days: int = Field(default=14, ge=0)
    metric: str = "ndcg@10"


def landing_days(landing_dir: Path, pattern: str, cutoff: date, end: date | None) -> list[date]:
    """Return the dates of landing files after ``cutoff`` (up to ``end``), oldest first.

    A landing file is named after its day (``YYYY-MM-DD...``); other files are skipped.
    """
    if not landing_dir.is_dir():
        raise ReplayError(
            f"landing folder {landing_dir} not found; set SHOPREC_LANDING_DIR to the folder of "
            "the daily files"
        )
    days = set()
    for path in landing_dir.glob(pattern):
        try:
            day = date.fromisoformat(path.stem[:10])
        except ValueError:
            logger.warning("%s is not named YYYY-MM-DD; left out of the replay", path.name)
            continue
        if day > cutoff and (end is None or day <= end):
            days.add(day)
    return sorted(days)


def may_retrain(
    day: date,
    decision: str,
    retrain_days: list[date],
    config: ReplayConfig,
) -> tuple[bool, str]:
    """Decide whether the replay acts on the monitor's decision; return it with the reason."""
    if decision != "retrain":
        return False, f"monitor decision: {decision}"
    if len(retrain_days) >= config.max_retrains:
        return False, f"retrain budget used ({config.max_retrains} retrains)"
    if retrain_days and (day - retrain_days[-1]).days < config.min_retrain_gap_days:
        gap = (day - retrain_days[-1]).days
        return False, f"last retrain {gap} days ago (min gap {config.min_retrain_gap_days})"
    return True, "monitor decision: retrain"


def read_state(path: Path) -> dict[str, Any]:
    """Read the replay state (days already done), or an empty state."""
    if not path.exists():
        return {"days": [], "initial_model": None}
    return json.loads(path.read_text(encoding="utf-8"))


def write_state(state: dict[str, Any], path: Path) -> None:
    """Write the replay state atomically, so an interrupted replay resumes after its last day."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


def build_timeline(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Return one row per replayed day with the columns of ``TIMELINE_COLUMNS``."""
    frame = pd.DataFrame(records, columns=list(TIMELINE_COLUMNS))
    frame["reasons"] = frame["reasons"].map(
        lambda value: "; ".join(value) if isinstance(value, list) else value
    )
    return frame.sort_values("day").reset_index(drop=True)


def summarize(timeline: pd.DataFrame, config: ReplayConfig) -> dict[str, Any]:
    """Compare the mean online quality with and without retraining over the same days.

    Only days on which both values were measured count.
    """
    both = timeline.dropna(subset=["quality", "quality_without_retraining"])
    retrains = timeline[timeline["retrained"].fillna(False).astype(bool)]
    with_retraining = float(both["quality"].mean()) if len(both) else None
    without = float(both["quality_without_retraining"].mean()) if len(both) else None
    return {
        "metric": config.metric,
        "days_replayed": int(len(timeline)),
        "days_compared": int(len(both)),
        "first_day": str(timeline["day"].min()) if len(timeline) else None,
        "last_day": str(timeline["day"].max()) if len(timeline) else None,
        "mean_with_retraining": None if with_retraining is None else round(with_retraining, 6),
        "mean_without_retraining": None if without is None else round(without, 6),
        "difference": None
        if with_retraining is None or without is None
        else round(with_retraining - without, 6),
        "retrains": [
            {
                "day": str(row.day),
                "reasons": row.reasons,
                "promoted": None if pd.isna(row.promoted) else bool(row.promoted),
            }
            for row in retrains.itertuples()
        ],
        "decisions": {str(k): int(v) for k, v in timeline["decision"].value_counts().items()},
    }


def render_summary_markdown(summary: dict[str, Any]) -> str:
    """Render the replay summary as a short Markdown page."""
    metric = summary["metric"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "# Replay of the landing days after the cutoff",
        "",
        f"Days replayed: {summary['days_replayed']} ({summary['first_day']} to "
        f"{summary['last_day']}); days with both values measured: {summary['days_compared']}.",
        "",
        f"| online {metric} (mean over the same days) | value |",
        "|---|---|",
        f"| with retraining | {fmt(summary['mean_with_retraining'])} |",
        f"| without retraining (initial champion) | {fmt(summary['mean_without_retraining'])} |",
        f"| difference | {fmt(summary['difference'])} |",
        "",
        f"Monitor decisions: {', '.join(f'{k} {v}' for k, v in summary['decisions'].items())}.",
        "",
        f"Retrains: {len(summary['retrains'])}.",
    ]
    for retrain in summary["retrains"]:
        promoted = {True: "promoted", False: "not promoted", None: "gate unknown"}
        lines.append(f"- {retrain['day']} ({promoted[retrain['promoted']]}): {retrain['reasons']}")
    return "\n".join(lines) + "\n"


def plot_timeline(timeline: pd.DataFrame, path: Path, metric: str) -> Path:
    """Plot the daily online quality with and without retraining, the drift share and retrains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = pd.to_datetime(timeline["day"])
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    top.plot(days, timeline["quality"], marker=".", label="with retraining")
    top.plot(
        days,
        timeline["quality_without_retraining"],
        marker=".",
        linestyle="--",
        label="without retraining (initial champion)",
    )
    top.set_ylabel(f"online {metric}")
    bottom.bar(days, timeline["drift_share"].fillna(0.0), color="#999", label="drift share")
    bottom.set_ylabel("drift share")
    bottom.set_ylim(0, 1)

    retrains = timeline[timeline["retrained"].fillna(False).astype(bool)]
    for row in retrains.itertuples():
        for axis in (top, bottom):
            axis.axvline(pd.Timestamp(row.day), color="#c33", linestyle=":")
        outcome = "promoted" if row.promoted is True else "not promoted"
        reason = f"{outcome}: {row.retrain_reason or row.reasons}"[:70]
        top.annotate(
            reason,
            (pd.Timestamp(row.day), top.get_ylim()[1]),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="#c33",
        )
    top.legend(loc="lower left")
    top.set_title("Online quality of the model in force, day by day (red: retrain)")
    figure.autofmt_xdate()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(records: list[dict[str, Any]], out_dir: Path, config: ReplayConfig) -> dict:
    """Write timeline.csv/json, summary.json/md and timeline.png; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    timeline = build_timeline(records)
    timeline.to_csv(out_dir / "timeline.csv", index=False)
    (out_dir / "timeline.json").write_text(
        timeline.to_json(orient="records", indent=1), encoding="utf-8"
    )
    summary = summarize(timeline, config)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out_dir / "summary.md").write_text(render_summary_markdown(summary), encoding="utf-8")
    if len(timeline):
        plot_timeline(timeline, out_dir / "timeline.png", config.metric)
    logger.info("replay outputs written to %s", out_dir)
    return summary
