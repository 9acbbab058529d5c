"""CLI commands ``shoprec train`` and ``shoprec evaluate``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shoprec.registry import load_metrics
from shoprec.report import best_baseline, metrics_table

TRAIN_FLOW_FILE = Path("flows/train.py")
DEFAULT_METRICS_FILE = Path("reports/metrics.json")
DEFAULT_REPORT_PAGE = Path("reports/evaluation/index.html")

ProjectDirOption = Annotated[
    Path,
    typer.Option(
        "--project-dir",
        help="Project root containing params.yaml, dvc.yaml and flows/train.py.",
        file_okay=False,
        exists=True,
    ),
]


def register(app: typer.Typer) -> None:
    """Add the ``train`` and ``evaluate`` commands to the shoprec CLI."""
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)


def train_command(
    project_dir: ProjectDirOption = Path("."),
    force: Annotated[
        bool,
        typer.Option("--force", help="Rerun every DVC stage, even those that are up to date."),
    ] = False,
) -> None:
    """Run the Prefect flow 'train': dvc repro, register the model, gate and promote it."""
    from prefect.flows import load_flow_from_entrypoint

    flow_file = project_dir / TRAIN_FLOW_FILE
    if not flow_file.exists():
        raise typer.BadParameter(
            f"{flow_file} not found; pass the project root with --project-dir",
            param_hint="--project-dir",
        )
    train_flow = load_flow_from_entrypoint(f"{flow_file}:train", use_placeholder_flow=False)
    summary = train_flow(project_dir=project_dir, force=force)

    console = Console()
    status = "promoted to champion" if summary["promoted"] else "not promoted"
    console.print(f"model [bold]{summary['model_tag']}[/bold] {status}")
    for reason in summary["reasons"]:
        console.print(f"  - {reason}")


def evaluate_command(
    metrics_file: Annotated[
        Path,
        typer.Option("--metrics-file", help="Metrics JSON written by the evaluate stage."),
    ] = DEFAULT_METRICS_FILE,
    report_page: Annotated[
        Path,
        typer.Option("--report", help="Evaluation report page to point to."),
    ] = DEFAULT_REPORT_PAGE,
) -> None:
    """Print the evaluation metrics of every model, one table per variant."""
    metrics = load_metrics(metrics_file)
    console = Console()
    for table in build_metric_tables(metrics):
        console.print(table)

    candidate_recall = metrics.get("candidate_recall")
    if candidate_recall:
        recall_all = _format(candidate_recall.get("all"))
        recall_new = _format(candidate_recall.get("new"))
        console.print(
            f"candidate recall at {candidate_recall.get('n_candidates')} candidates: "
            f"all={recall_all}, new={recall_new}"
        )
    if report_page.exists():
        console.print(f"report: {report_page}")
    else:
        console.print(f"report: {report_page} not written yet; run 'dvc repro'")


def build_metric_tables(metrics: dict[str, Any]) -> list[Table]:
    """Build one Rich table of models x metrics per variant in ``metrics``."""
    tables = []
    n_users = metrics.get("n_users", {})
    for variant in ("all", "new"):
        if variant not in metrics:
            continue
        frame = metrics_table(metrics[variant])
        best = best_baseline(frame)
        users = n_users.get(variant)
        title = f"variant {variant}" + (f" ({users} users)" if users is not None else "")

        table = Table(title=title)
        # Narrow terminals fold long metric names onto two lines instead of cutting them.
        table.add_column("model", no_wrap=True)
        for column in frame.columns:
            table.add_column(str(column), justify="right", overflow="fold")
        for name, values in frame.iterrows():
            style = None
            if name == "two_stage":
                style = "bold green"
            elif name == best:
                style = "yellow"
            table.add_row(str(name), *(_format(v) for v in values), style=style)
        tables.append(table)
    return tables


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)
