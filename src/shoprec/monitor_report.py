"""Drift report files: reports/drift/<date>.json and .html, and the index page of every day."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from shoprec.monitor import DayResult

logger = logging.getLogger(__name__)

INDEX_FILE = "index.html"

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
tr.retrain { background: #f2dede; } tr.skip { color: #888; }
"""


def render_banner(summary: dict[str, Any]) -> str:
    """Render the decision, reasons, online quality and notes of a day as an HTML block."""
    items = "".join(f"<li>{html.escape(reason)}</li>" for reason in summary["reasons"])
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in summary["notes"])
    quality = ", ".join(f"{k} = {v}" for k, v in summary["online_quality"].items())
    share = summary["drift_share"]
    return (
        '<div style="font-family:sans-serif;padding:1em;border-bottom:2px solid #888">'
        f"<h2>shoprec monitor {html.escape(summary['day'])}: "
        f"decision <b>{html.escape(summary['decision'])}</b></h2>"
        f"<p>model {html.escape(str(summary.get('model_tag')))}, "
        f"{summary['n_rows']} events, {summary['n_buyers']} identified buyers, "
        f"drift share {'n/a' if share is None else f'{share:.2f}'}, "
        f"online quality: {html.escape(quality)}, "
        f"training-time value: {summary['training_quality']}</p>"
        f"<p>Reasons:</p><ul>{items}</ul>"
        + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "")
        + "</div>"
    )


def write_day_report(result: DayResult, summary: dict[str, Any], out_dir: Path) -> Path:
    """Write <date>.json and <date>.html (Evidently's report under the decision banner)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result.day.isoformat()
    json_file = out_dir / f"{stem}.json"
    json_file.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")

    banner = render_banner(summary)
    if result.drift.snapshot is not None:
        # NOTE: Evidently 0.7.23's save_html writes nothing when given a file object, so the
        # page comes from get_html_str, the call save_html makes for a path.
        html_page = result.drift.snapshot.get_html_str(as_iframe=False)
        page = html_page.replace("<body>", "<body>" + banner, 1)
    else:
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{stem}</title></head>"
            f"<body>{banner}<p>No Evidently report: no monitored column had values in both "
            "windows.</p></body></html>"
        )
    (out_dir / f"{stem}.html").write_text(page, encoding="utf-8")
    logger.info("drift report for %s written to %s", stem, out_dir)
    return json_file


def read_day_summaries(out_dir: Path) -> list[dict[str, Any]]:
    """Read every <date>.json of ``out_dir``, oldest first."""
    summaries = []
    for path in sorted(out_dir.glob("????-??-??.json")):
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; left out of the drift index", path)
    return summaries


def previous_quality(
    summaries: list[dict[str, Any]], model_tag: str, before: str, metric: str
) -> list[float]:
    """Return the online ``metric`` of ``model_tag`` on monitored days before ``before``."""
    values = []
    for summary in summaries:
        value = summary.get("online_quality", {}).get(metric)
        if summary.get("model_tag") == model_tag and summary["day"] < before and value is not None:
            values.append(float(value))
    return values


def write_index(out_dir: Path) -> Path:
    """Write reports/drift/index.html listing every monitored day, newest first."""
    rows = []
    for summary in reversed(read_day_summaries(out_dir)):
        day = html.escape(summary["day"])
        share = summary.get("drift_share")
        quality = summary.get("online_quality", {})
        rows.append(
            f"<tr class='{html.escape(summary['decision'])}'>"
            f"<td><a href='{day}.html'>{day}</a> (<a href='{day}.json'>json</a>)</td>"
            f"<td>{'n/a' if share is None else f'{share:.2f}'}</td>"
            f"<td>{quality.get('ndcg@10', 'n/a')}</td><td>{quality.get('hit_rate@10', 'n/a')}</td>"
            f"<td>{quality.get('n_users', 0)}</td>"
            f"<td>{html.escape(str(summary.get('model_tag')))}</td>"
            f"<td>{html.escape(summary['decision'])}</td>"
            f"<td>{html.escape('; '.join(summary['reasons']))}</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>shoprec drift</title>"
        f"<style>{_STYLE}</style></head><body><h1>shoprec drift monitoring</h1>"
        "<p>One row per monitored day. HTML reports are generated locally and not committed; "
        "the JSON summaries are.</p><table><tr><th>day</th><th>drift share</th>"
        "<th>online ndcg@10</th><th>online hit rate@10</th><th>users scored</th><th>model</th>"
        "<th>decision</th><th>reasons</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    index = out_dir / INDEX_FILE
    index.write_text(page, encoding="utf-8")
    return index
