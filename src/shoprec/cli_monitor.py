"""CLI commands ``shoprec monitor`` and ``shoprec replay``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

ProjectDirOption = Annotated[
    Path,
    typer.Option(
        "--project-dir",
        help="Project root containing params.yaml, dvc.yaml and flows/.",
        file_okay=False,
        exists=True,
    ),
]


def register(app: typer.Typer) -> None:
    """Add the ``monitor`` and ``replay`` commands to the shoprec CLI."""
    app.command("monitor")(monitor_command)
    app.command("replay")(replay_command)


def monitor_command(
    project_dir: ProjectDirOption = Path("."),
    day: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"], help="Day to monitor (YYYY-MM-DD); default: newest stored day."
        ),
    ] = None,
    no_retrain: Annotated[
        bool,
        typer.Option(
            "--no-retrain",
            help="Report the decision and emit the retrain event, but do not start training.",
        ),
    ] = False,
) -> None:
    """Run the Prefect flow 'monitor': drift and online quality of one day, retrain decision."""
    from flows.monitor import monitor

    summary = monitor(
        day=day.date() if day else None, project_dir=project_dir, start_training=not no_retrain
    )
    console = Console()
    share = summary["drift_share"]
    console.print(
        f"{summary['day']}: decision [bold]{summary['decision']}[/bold], drift share "
        f"{'n/a' if share is None else f'{share:.2f}'}, online quality {summary['online_quality']}"
    )
    for reason in summary["reasons"]:
        console.print(f"  - {reason}")
    console.print(f"report: reports/drift/{summary['day']}.html")


def replay_command(
    project_dir: ProjectDirOption = Path("."),
    end: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"], help="Last day to replay (YYYY-MM-DD); default: 'replay.end'."
        ),
    ] = None,
) -> None:
    """Run the Prefect flow 'replay': ingest, monitor and retrain day by day after the cutoff."""
    from flows.replay import replay

    summary = replay(project_dir=project_dir, end=end.date() if end else None)
    console = Console()
    console.print(
        f"online {summary['metric']} over {summary['days_compared']} days: "
        f"{summary['mean_with_retraining']} with retraining, "
        f"{summary['mean_without_retraining']} without; {len(summary['retrains'])} retrain(s)"
    )
    console.print("details: reports/replay/summary.md and reports/replay/timeline.png")
