"""Benchmark: latency and throughput of POST /recommend on a served Bento, under load.

Registers the trained bundle as champion in a temporary BentoML home and starts `bentoml serve`
from the project root on a free loopback port. Locust then runs headless at several client
counts against a mix of three kinds of shoppers: known ones (raw customer ids from the landing
files, which the service pseudonymizes with the ingestion key), ones with online events (ALS
fold-in) and unknown ones. The script also times the same call in-process (the floor) and the
delay until a posted purchase shows in the shopper's next recommendations. It writes JSON and
prints Markdown.

    .venv/bin/python bench/serve_bench.py --users 1 8 32 --run-time 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from shoprec.bundle import ModelBundle
from shoprec.config import load_params, params_section
from shoprec.privacy import Pseudonymizer, load_or_create_key
from shoprec.serving import prepare_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LANDING_DIR = REPO_ROOT.parent / "shared/data/online-retail/by-day"
TOKEN = "bench-token-0123456789"
REGISTER_CHAMPION = """
import sys
from pathlib import Path
from shoprec import registry
model = registry.register_challenger(Path(sys.argv[1]), {}, {})
registry.promote(model.tag)
print(model.tag)
"""


def raw_ids_by_pseudonym(landing: Path, key_file: Path) -> dict[str, str]:
    """Map the pseudonym of every CustomerID in the landing files to the raw id (read only)."""
    if not key_file.exists():
        raise SystemExit(f"key file {key_file} not found; pass the ingestion key with --key-file")
    raw_ids: set[str] = set()
    for path in sorted(landing.glob("*.csv")):
        column = pd.read_csv(path, dtype=str, usecols=["CustomerID"])["CustomerID"]
        raw_ids |= set(column.dropna().str.replace(r"\.0+$", "", regex=True))
    pseudonymizer = Pseudonymizer(load_or_create_key(None, key_file))
    return {pseudonymizer.user_id(raw): raw for raw in sorted(raw_ids)}


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2)}


def online_purchase(item_id: str) -> pd.DataFrame:
    """One purchase as the SQLite online store returns it (no order id, no country)."""
    return pd.DataFrame(
        {
            "user_id": ["bench"],
            "item_id": [item_id],
            "event_type": ["purchase"],
            "quantity": [1],
            "price": [np.nan],
            "ts": [pd.Timestamp.now(tz="UTC")],
            "order_id": [None],
            "country": [None],
        }
    )


def in_process_floor(
    bundle: ModelBundle, exclude: set[str], users: dict[str, list], n: int
) -> dict[str, dict]:
    """Time bundle.recommend as the service calls it (inactive items excluded)."""
    empty = online_purchase("x").iloc[0:0]
    floor = {}
    for kind, calls in users.items():
        times = []
        for user_id, item in (calls * n)[:n]:
            history = online_purchase(item) if item else empty
            start = time.perf_counter()
            bundle.recommend(history, 10, exclude_items=exclude, user_id=user_id)
            times.append((time.perf_counter() - start) * 1000)
        floor[kind] = {"calls": n, **percentiles(times)}
    return floor


class LoadSampler(threading.Thread):
    """Sample the 1-minute load average every few seconds while a run is going."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(3.0):
            self.samples.append(os.getloadavg()[0])


def start_server(home: Path, key_file: Path, bundle_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "OPENBLAS_NUM_THREADS": "1",
        "SHOPREC_API_TOKEN": TOKEN,
        "SHOPREC_KEY_FILE": str(key_file),
        "SHOPREC_ONLINE_DB": str(home / "online.sqlite"),
        "SHOPREC_PARAMS_FILE": str(REPO_ROOT / "params.yaml"),
    }
    for name in ("SHOPREC_PSEUDONYM_KEY", "SHOPREC_REDIS_URL", "SHOPREC_INSECURE_LOCAL"):
        env.pop(name, None)
    subprocess.run(
        [sys.executable, "-c", REGISTER_CHAMPION, str(bundle_dir)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (home / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited; see {home / 'serve.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError(f"bentoml serve not ready after 180 s; see {home / 'serve.log'}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def run_locust(url: str, users: int, run_time: int, out: Path, env: dict) -> dict:
    """Run Locust headless and return the aggregated and per-kind stats of its CSV."""
    prefix = out / f"locust_{users}"
    command = [
        *(sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "bench/locustfile.py")),
        *("--headless", "-u", str(users), "-r", str(users), "--run-time", f"{run_time}s"),
        *("--host", url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"),
    ]
    sampler = LoadSampler()
    sampler.start()
    subprocess.run(
        command, env=env, check=False, timeout=run_time + 60, capture_output=True, text=True
    )
    sampler.stop.set()
    rows = {}
    with open(f"{prefix}_stats.csv", newline="") as stats:
        for row in csv.DictReader(stats):
            rows[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "errors": int(row["Failure Count"]),
                "p50_ms": float(row["50%"]),
                "p95_ms": float(row["95%"]),
                "p99_ms": float(row["99%"]),
                "rps": round(float(row["Requests/s"]), 1),
            }
    total = rows.pop("Aggregated")
    return {**total, "by_kind": rows, "load_avg_1m": sampler.samples}


def event_delay(
    url: str, bundle: ModelBundle, servable: frozenset[str], trials: int, seed: int
) -> list[dict]:
    """Post a purchase for a new shopper and time until its co-purchases are recommended.

    The co-purchases looked for are the item's 10 strongest servable partners.
    """
    model = bundle.candidate_model
    strength = np.asarray(model.copurchase.max(axis=1).todense()).ravel()
    items = list(model.items.ids.to_numpy()[np.argsort(-strength, kind="stable")[: trials * 4]])
    random.Random(seed).shuffle(items)
    results = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for trial, item in enumerate(items[:trials]):
            row = model.copurchase.getrow(model.items.to_index([item])[0])
            ranked = model.items.ids.to_numpy()[row.indices[np.argsort(-row.data)]]
            partners = {partner for partner in ranked if partner in servable}
            partners = set(sorted(partners, key=list(ranked).index)[:10])
            shopper = f"bench-event-{seed}-{trial}"
            before = client.post("/recommend", json={"user_id": shopper, "k": 10}).json()
            sent = time.perf_counter()
            client.post(
                "/events",
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"user_id": shopper, "events": [{"item_id": item, "event_type": "purchase"}]},
            )
            requests, visible, first = 0, False, None
            while not visible and time.perf_counter() - sent < 5:
                body = client.post("/recommend", json={"user_id": shopper, "k": 10}).json()
                first = first or body
                requests += 1
                visible = bool(partners & {entry["item_id"] for entry in body["items"]})
            results.append(
                {
                    "item_id": item,
                    # The next response differs from the cold-start one, so the event was read.
                    "event_read_on_next_request": not first["cold_start"]
                    and first["items"] != before["items"],
                    "visible": visible,
                    "visible_on_next_request": visible and requests == 1,
                    "delay_ms": round((time.perf_counter() - sent) * 1000, 1),
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "artifacts/model")
    parser.add_argument("--landing", type=Path, default=LANDING_DIR)
    parser.add_argument("--key-file", type=Path, default=REPO_ROOT / ".shoprec/pseudonym.key")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--run-time", type=int, default=30, help="seconds per Locust run")
    parser.add_argument("--known", type=int, default=300, help="known shoppers in the mix")
    parser.add_argument("--active", type=int, default=50, help="shoppers given online events")
    parser.add_argument("--floor-calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/serve.json")
    args = parser.parse_args()
    rng = random.Random(42)

    bundle = ModelBundle.load(args.bundle)
    by_pseudonym = raw_ids_by_pseudonym(args.landing, args.key_file)
    trained = sorted(set(bundle.purchases["user_id"]) & set(by_pseudonym))
    if not trained:
        raise SystemExit(f"no landing customer id maps to a user of {args.bundle}; wrong key file?")
    chosen = rng.sample(trained, min(len(trained), args.known + args.active))
    known, active = chosen[: args.known], chosen[args.known :]
    popular = list(bundle.candidate_model.popular.index[:200])
    active_items = {user: rng.choice(popular) for user in active}

    inactive_days = params_section(load_params(REPO_ROOT / "params.yaml"), "serving")[
        "inactive_days"
    ]
    served = prepare_model(bundle, "bench", inactive_days)
    floor = in_process_floor(
        bundle,
        set(served.inactive_items),
        {
            "known": [(user, None) for user in known],
            "active": [(user, active_items[user]) for user in active],
            "unknown": [(f"unknown-{i}", None) for i in range(50)],
        },
        args.floor_calls,
    )

    servable = served.servable_items
    runs = {}
    with tempfile.TemporaryDirectory(prefix="shoprec-serve-bench-") as tmp:
        home = Path(tmp)
        process, url = start_server(home, args.key_file, args.bundle)
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                for user, item in active_items.items():
                    event = {"item_id": item, "event_type": "purchase"}
                    client.post(
                        "/events",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"user_id": by_pseudonym[user], "events": [event]},
                    ).raise_for_status()
            env = {
                **os.environ,
                "BENCH_KNOWN_IDS": ",".join(by_pseudonym[user] for user in known),
                "BENCH_ACTIVE_IDS": ",".join(by_pseudonym[user] for user in active),
                "BENCH_MIX": "0.6,0.2,0.2",
            }
            for users in args.users:
                runs[str(users)] = run_locust(url, users, args.run_time, home, env)
            delays = event_delay(url, bundle, servable, trials=5, seed=7)
        finally:
            stop_server(process)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs ran during the benchmark (see load_avg_1m)",
        },
        "mix": {"known": 0.6, "active_fold_in": 0.2, "unknown": 0.2, "k": 10},
        "in_process_floor": floor,
        "http": runs,
        "event_to_visible": delays,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"POST /recommend, {result['date']}, {result['machine']['nproc']} CPUs (shared), "
        f"Python {result['machine']['python']}",
        "",
        "| clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for users, run in result["http"].items():
        load = run["load_avg_1m"]
        load_text = f"{min(load):.1f}-{max(load):.1f}" if load else "n/a"
        lines.append(
            f"| {users} | {run['requests']} | {run['errors']} | {run['rps']} | {run['p50_ms']:.0f}"
            f" | {run['p95_ms']:.0f} | {run['p99_ms']:.0f} | {load_text} |"
        )
    lines += ["", "| clients | kind | requests | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for users, run in result["http"].items():
        for name, row in run["by_kind"].items():
            kind = name.split("[")[-1].rstrip("]")
            p50, p99 = row["p50_ms"], row["p99_ms"]
            lines.append(f"| {users} | {kind} | {row['requests']} | {p50:.0f} | {p99:.0f} |")
    lines += ["", "| in-process floor | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    for kind, floor in result["in_process_floor"].items():
        lines.append(f"| {kind} | {floor['p50_ms']} | {floor['p95_ms']} | {floor['p99_ms']} |")
    delays = result["event_to_visible"]
    lines += [
        "",
        f"event to visible: {sum(d['event_read_on_next_request'] for d in delays)}/{len(delays)}"
        " events changed the very next answer, "
        f"{sum(d['visible'] for d in delays)}/{len(delays)} brought co-purchases in, "
        f"{sum(d['visible_on_next_request'] for d in delays)}/{len(delays)} on the next request, "
        f"delays {[d['delay_ms'] for d in delays]} ms",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
