"""Benchmark: the time to monitor one day (drift report, predictions, online quality).

Loads the event store and the champion once, then times the monitor step of
several real days in the same process (as the replay runs it), writing the
reports to a temporary folder. With --cold, also times one complete
`shoprec monitor --no-retrain` command (new process, temporary Prefect API).

    .venv/bin/python bench/monitor_bench.py --days 10 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=10, help="number of days to monitor")
    parser.add_argument("--first-day", default="2011-11-14", help="first day (YYYY-MM-DD)")
    parser.add_argument("--cold", action="store_true", help="also time one CLI run")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/monitor.json")
    args = parser.parse_args()

    from flows.monitor import champion_info, run_monitor_day

    from shoprec.config import Settings, load_params
    from shoprec.monitor import MonitorConfig
    from shoprec.store import read_events

    settings = Settings()
    config = MonitorConfig.model_validate(load_params(settings.params_file)["monitor"])
    events = read_events(settings.data_dir)
    tag, metadata = champion_info()
    available = set(events["ts"].dt.date)
    day = date.fromisoformat(args.first_day)
    timings = []
    with tempfile.TemporaryDirectory(prefix="shoprec-monitor-bench-") as drift_dir:
        while len(timings) < args.days:
            if day in available:
                start = time.perf_counter()
                summary = run_monitor_day.fn(events, tag, metadata, day, config, Path(drift_dir))
                timings.append(time.perf_counter() - start)
                print(f"{day}: {timings[-1]:.2f} s, decision {summary['decision']}", flush=True)
            day += timedelta(days=1)

    cold = None
    if args.cold:
        start = time.perf_counter()
        subprocess.run(
            [
                str(Path(sys.executable).with_name("shoprec")),
                "monitor",
                "--no-retrain",
                "--day",
                args.first_day,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cold = round(time.perf_counter() - start, 1)

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": tag,
        "days": len(timings),
        "median_s": round(statistics.median(timings), 2),
        "max_s": round(max(timings), 2),
        "cold_cli_s": cold,
        "load_average_after": os.getloadavg(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
