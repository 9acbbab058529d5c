"""The ``shoprec`` command line."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="shoprec",
    help="Real-time recommendations for online shops: ingest, train, serve, monitor.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("great_expectations", "httpx", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log DEBUG messages too.")
    ] = False,
) -> None:
    """Configure logging for every command."""
    _configure_logging(verbose)
    # A local run starts a temporary Prefect API: give it time on a busy machine, and keep
    # Prefect's telemetry off (the default deployment has no outside network).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@app.command()
def ingest(
    landing_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of landing files; default: SHOPREC_LANDING_DIR."),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%d"], help="Ingest only files of days up to this date."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Ingest at most this many new files.")
    ] = None,
    no_version: Annotated[
        bool, typer.Option("--no-version", help="Do not record a DVC version of the store.")
    ] = False,
    task_runner: Annotated[
        str | None,
        typer.Option(
            help="Task runner of the per-file tasks: thread, process, dask (a local Dask "
            "cluster) or tcp://HOST:PORT of a Dask scheduler; default: SHOPREC_TASK_RUNNER."
        ),
    ] = None,
) -> None:
    """Ingest new landing files into the validated, DVC-versioned event store."""
    from flows.ingest import ingest as ingest_flow

    from shoprec.config import Settings
    from shoprec.summary import IngestSummary
    from shoprec.task_runners import build_task_runner

    runner = build_task_runner(task_runner or Settings().task_runner)
    result = ingest_flow.with_options(task_runner=runner)(
        landing_dir=str(landing_dir) if landing_dir else None,
        until=until.date() if until else None,
        limit=limit,
        version=False if no_version else None,
    )
    summary = IngestSummary(
        files=result["files"],
        rejected=result["files_rejected"],
        data_version=result["data_version"],
        previous_data_version=result["previous_data_version"],
    )
    console.print(summary.render_text())
    if result["files_rejected"]:
        raise typer.Exit(code=1)


@app.command()
def status() -> None:
    """Print what the event store holds: files, row counts by outcome, data version."""
    from shoprec.config import Settings
    from shoprec.store import EventStore
    from shoprec.summary import IngestSummary
    from shoprec.versioning import data_version

    settings = Settings()
    store = EventStore(settings.data_dir, settings.staging_dir)
    batches = sorted(store.manifest()["batches"].values(), key=lambda b: b["source_file"])
    summary = IngestSummary(
        files=[{"source_file": b["source_file"], **b["counts"]} for b in batches],
        data_version=data_version(Path(f"{settings.data_dir}.dvc")),
    )
    summary.title = f"event store {settings.data_dir}"
    console.print(summary.render_text())


@app.command("build-bento")
def build_bento(
    bentofile: Annotated[Path, typer.Option(help="BentoML build file.")] = Path("bentofile.yaml"),
) -> None:
    """Build the Bento of the current champion, unless one was built for it already."""
    import bentoml

    from shoprec import registry

    champion = registry.get_champion()
    if champion is None:
        console.print(
            "[red]no champion in the BentoML model store; run 'shoprec train' first[/red]"
        )
        raise typer.Exit(code=1)
    version = champion.tag.version
    try:
        bentos = bentoml.bentos.list("shoprec")
    except bentoml.exceptions.NotFound:
        bentos = []
    for bento in bentos:
        if bento.info.labels.get("champion") == version:
            console.print(f"Bento {bento.tag} already contains champion {champion.tag}")
            return
    bento = bentoml.bentos.build_bentofile(str(bentofile), labels={"champion": version})
    console.print(f"built Bento {bento.tag} for champion {champion.tag}")


def _register_optional_commands() -> None:
    """Add the commands of the training, pipeline-stage and monitoring modules."""
    from shoprec import cli_monitor, cli_train, stages

    cli_train.register(app)
    stages.register(app)
    cli_monitor.register(app)


_register_optional_commands()

if __name__ == "__main__":
    app()
