"""Benchmark: ingest the whole landing folder with the real CLI, several times.

Each run starts from an empty event store in a new git + DVC project, runs
``shoprec ingest`` (Prefect flow, GX validation, store commits, ``dvc add``) and
times it from the outside. Prints a Markdown row for BENCHMARKS.md and writes
the raw timings as JSON.

    .venv/bin/python bench/ingest_bench.py --runs 3
    .venv/bin/python bench/ingest_bench.py --runs 2 --task-runner dask \
        --output bench/results/ingest-dask.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_once(landing: Path, runner: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="shoprec-bench-") as tmp:
        project = Path(tmp)
        shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
        env = {
            **os.environ,
            "SHOPREC_LANDING_DIR": str(landing),
            "SHOPREC_PSEUDONYM_KEY": "benchmark-key-0123456789abcdef",
            "SHOPREC_TASK_RUNNER": runner,
            "PREFECT_HOME": str(project / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        shoprec = Path(sys.executable).with_name("shoprec")
        start = time.perf_counter()
        subprocess.run(
            [str(shoprec), "ingest"],
            cwd=project,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        elapsed = time.perf_counter() - start
        manifest = json.loads((project / "data/manifest.json").read_text())
        rows = sum(b["counts"]["rows_read"] for b in manifest["batches"].values())
        return elapsed, {"files": len(manifest["batches"]), "rows_read": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of timed runs")
    parser.add_argument(
        "--task-runner",
        "--runner",
        dest="runner",
        default="thread",
        help="task runner of the per-file tasks (SHOPREC_TASK_RUNNER): thread, process, dask "
        "or tcp://HOST:PORT",
    )
    parser.add_argument(
        "--landing-dir",
        type=Path,
        default=REPO_ROOT.parent / "shared/data/online-retail/by-day",
        help="folder of landing files",
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/ingest.json")
    args = parser.parse_args()

    timings = []
    for number in range(1, args.runs + 1):
        elapsed, counts = run_once(args.landing_dir, args.runner)
        timings.append(elapsed)
        print(f"run {number}: {elapsed:.1f} s, {counts}", flush=True)

    median = statistics.median(timings)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "runner": args.runner,
        "runs_s": [round(t, 1) for t in timings],
        "median_s": round(median, 1),
        "rows_read": counts["rows_read"],
        "files": counts["files"],
        "rows_per_s_median": round(counts["rows_read"] / median),
        "load_average_after": os.getloadavg(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(
        f"| {result['date']} | {args.runner} | {result['files']} | {result['rows_read']:,} | "
        f"{result['median_s']} s | {result['rows_per_s_median']:,} rows/s | {result['runs_s']} |"
    )


if __name__ == "__main__":
    main()
