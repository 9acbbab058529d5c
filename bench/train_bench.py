"""Benchmark: the full retrain (candidates, features, rank, evaluate) on the whole store.

Runs each DVC stage with the real CLI (`shoprec stage NAME`) in a scratch copy of
the project, several times, and reports the median time per stage and in total.
The event store is read from SHOPREC_DATA_DIR (default: this project's data/).

    .venv/bin/python bench/train_bench.py --runs 3
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
STAGES = ("candidates", "features", "rank", "evaluate")


def run_stages(project: Path, env: dict[str, str]) -> dict[str, float]:
    shoprec = Path(sys.executable).with_name("shoprec")
    timings = {}
    for stage in STAGES:
        start = time.perf_counter()
        subprocess.run(
            [str(shoprec), "stage", stage],
            cwd=project,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        timings[stage] = time.perf_counter() - start
    timings["total"] = sum(timings[stage] for stage in STAGES)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of timed runs")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/train.json")
    args = parser.parse_args()

    data_dir = Path(os.environ.get("SHOPREC_DATA_DIR", REPO_ROOT / "data")).resolve()
    env = {**os.environ, "SHOPREC_DATA_DIR": str(data_dir), "OPENBLAS_NUM_THREADS": "1"}
    runs = []
    with tempfile.TemporaryDirectory(prefix="shoprec-train-bench-") as tmp:
        project = Path(tmp)
        shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
        for number in range(1, args.runs + 1):
            timings = run_stages(project, env)
            runs.append(timings)
            metrics = json.loads((project / "reports/metrics.json").read_text())
            print(
                f"run {number}: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                + f"; ndcg@10 all {metrics['all']['two_stage']['ndcg@10']:.4f}",
                flush=True,
            )

    medians = {name: round(statistics.median(r[name] for r in runs), 1) for name in runs[0]}
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "runs": [{k: round(v, 1) for k, v in r.items()} for r in runs],
        "median_s": medians,
        "load_average_after": os.getloadavg(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print("| " + " | ".join(f"{medians[name]} s" for name in (*STAGES, "total")) + " |")


if __name__ == "__main__":
    main()
