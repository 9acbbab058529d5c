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
# Shares of the request kinds in bench/locustfile.py.
MIX = {"known": 0.6, "active": 0.2, "buying": 0.0, "unknown": 0.2}
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
    bundle: ModelBundle, exclude: frozenset[str], users: dict[str, list], n: int
) -> dict[str, dict]:
    """Time bundle.recommend as the service calls it (inactive items excluded).

    ``first`` empties the score cache before each call, as for a shopper's first request or
    the first after a new event. ``repeat`` calls again with the same history, so the cache hits.
    """
    empty = online_purchase("x").iloc[0:0]
    cache = bundle.prepare_online().scores
    floor = {}
    for kind, calls in users.items():
        first, repeat = [], []
        for user_id, item in (calls * n)[:n]:
            history = online_purchase(item) if item else empty
            cache.clear()
            for times in (first, repeat):
                start = time.perf_counter()
                bundle.recommend(history, 10, exclude_items=exclude, user_id=user_id)
                times.append((time.perf_counter() - start) * 1000)
        floor[kind] = {"calls": n, "first": percentiles(first), "repeat": percentiles(repeat)}
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


def service_env(home: Path, key_file: Path, workers: str, redis_url: str | None) -> dict:
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "OPENBLAS_NUM_THREADS": "1",
        "SHOPREC_API_TOKEN": TOKEN,
        "SHOPREC_KEY_FILE": str(key_file),
        "SHOPREC_ONLINE_DB": str(home / "online.sqlite"),
        "SHOPREC_PARAMS_FILE": str(REPO_ROOT / "params.yaml"),
        "SHOPREC_WORKERS": workers,
    }
    for name in ("SHOPREC_PSEUDONYM_KEY", "SHOPREC_REDIS_URL", "SHOPREC_INSECURE_LOCAL"):
        env.pop(name, None)
    if redis_url:
        env["SHOPREC_REDIS_URL"] = redis_url
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def register_champion(env: dict, bundle_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", REGISTER_CHAMPION, str(bundle_dir)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def start_redis(home: Path) -> tuple[subprocess.Popen, str]:
    """Start redis-server on a free loopback port, keeping nothing on disk."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(home),
        ],
        stdout=(home / "redis.log").open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"redis-server not responding on port {port}; see {home / 'redis.log'}")


def start_server(
    home: Path, env: dict, name: str, target: str = "."
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (home / f"serve-{name}.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"bentoml serve not ready after 180 s; see {log}")


def summarize(rows: pd.DataFrame, run_time: int) -> dict:
    """Count, errors, throughput and percentiles (ms) of the requests in `rows`."""
    return {
        "requests": len(rows),
        "errors": int((~rows["ok"]).sum()),
        **percentiles(rows["ms"].tolist()),
        "rps": round(len(rows) / run_time, 1),
    }


def cache_counts(urls: list[str]) -> dict[str, float]:
    """Sum the hit and miss counters of both caches over every server's /metrics."""
    counts = {
        f"{cache}_{result}": 0.0 for cache in ("score", "response") for result in ("hit", "miss")
    }
    for url in urls:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            for cache in ("score", "response"):
                if line.startswith(f"shoprec_{cache}_cache_total{{"):
                    result = line.split('result="')[1].split('"')[0]
                    counts[f"{cache}_{result}"] += float(line.rsplit(" ", 1)[1])
    return counts


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def run_locust(urls: list[str], users: int, run_time: int, out: Path, env: dict) -> dict:
    """Run Locust headless and return the aggregated and per-kind stats of its CSV."""
    prefix = out / f"locust_{users}"
    command = [
        *(sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "bench/locustfile.py")),
        *("--headless", "-u", str(users), "-r", str(users), "--run-time", f"{run_time}s"),
        *("--host", urls[0], "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"),
    ]
    env = {**env, "BENCH_HOSTS": ",".join(urls), "BENCH_LATENCY_FILE": f"{prefix}_latencies.csv"}
    before = cache_counts(urls)
    sampler = LoadSampler()
    sampler.start()
    subprocess.run(
        command, env=env, check=False, timeout=run_time + 60, capture_output=True, text=True
    )
    sampler.stop.set()
    latencies = pd.read_csv(f"{prefix}_latencies.csv")
    recommend = latencies[latencies["name"].str.startswith("/recommend")]
    total = summarize(recommend, run_time)
    rows = {
        name: summarize(group, run_time) for name, group in latencies.groupby("name", sort=True)
    }
    after = cache_counts(urls)
    caches = {}
    for name in ("score", "response"):
        hits, misses = (after[f"{name}_{r}"] - before[f"{name}_{r}"] for r in ("hit", "miss"))
        rate = round(hits / max(1, hits + misses), 3)
        caches[f"{name}_cache"] = {"hits": hits, "misses": misses, "hit_rate": rate}
    return {**total, "by_kind": rows, **caches, "load_avg_1m": sampler.samples}


def event_delay(
    urls: list[str], bundle: ModelBundle, servable: frozenset[str], trials: int, seed: int
) -> list[dict]:
    """Post a purchase for a new shopper and time until its co-purchases are recommended.

    The co-purchases looked for are the item's 10 strongest servable partners. The event goes
    to the first server and the recommendations come from the last one.
    """
    post_url, read_url = urls[0], urls[-1]
    model = bundle.candidate_model
    strength = np.asarray(model.copurchase.max(axis=1).todense()).ravel()
    items = list(model.items.ids.to_numpy()[np.argsort(-strength, kind="stable")[: trials * 4]])
    random.Random(seed).shuffle(items)
    results = []
    with httpx.Client(timeout=10) as client:
        for trial, item in enumerate(items[:trials]):
            row = model.copurchase.getrow(model.items.to_index([item])[0])
            ranked = model.items.ids.to_numpy()[row.indices[np.argsort(-row.data)]]
            partners = {partner for partner in ranked if partner in servable}
            partners = set(sorted(partners, key=list(ranked).index)[:10])
            shopper = f"bench-event-{seed}-{trial}"
            before = client.post(f"{read_url}/recommend", json={"user_id": shopper, "k": 10}).json()
            sent = time.perf_counter()
            client.post(
                f"{post_url}/events",
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"user_id": shopper, "events": [{"item_id": item, "event_type": "purchase"}]},
            )
            requests, visible, first = 0, False, None
            while not visible and time.perf_counter() - sent < 5:
                body = client.post(
                    f"{read_url}/recommend", json={"user_id": shopper, "k": 10}
                ).json()
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
    parser.add_argument(
        "--known", type=int, default=0, help="known shoppers in the mix (0: every trained one)"
    )
    parser.add_argument("--active", type=int, default=50, help="shoppers given online events")
    parser.add_argument("--floor-calls", type=int, default=200)
    parser.add_argument(
        "--workers", default="cpu_count", help="worker processes per server (SHOPREC_WORKERS)"
    )
    parser.add_argument("--replicas", type=int, default=1, help="servers sharing one Redis")
    parser.add_argument("--redis", action="store_true", help="online store in Redis, not SQLite")
    parser.add_argument(
        "--floor-service",
        action="store_true",
        help="serve bench/floor_service.py (fixed items) to measure the framework alone",
    )
    parser.add_argument(
        "--mix",
        default=",".join(str(share) for share in MIX.values()),
        help=f"shares of the request kinds {', '.join(MIX)}",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/serve.json")
    args = parser.parse_args()
    rng = random.Random(42)

    bundle = ModelBundle.load(args.bundle)
    by_pseudonym = raw_ids_by_pseudonym(args.landing, args.key_file)
    trained = sorted(set(bundle.purchases["user_id"]) & set(by_pseudonym))
    if not trained:
        raise SystemExit(f"no landing customer id maps to a user of {args.bundle}; wrong key file?")
    n_known = args.known or len(trained) - args.active
    chosen = rng.sample(trained, min(len(trained), n_known + args.active))
    known, active = chosen[:n_known], chosen[n_known:]
    popular = list(bundle.candidate_model.popular.index[:200])
    active_items = {user: rng.choice(popular) for user in active}

    inactive_days = params_section(load_params(REPO_ROOT / "params.yaml"), "serving")[
        "inactive_days"
    ]
    served = prepare_model(bundle, "bench", inactive_days)
    floor = in_process_floor(
        bundle,
        served.inactive_items,
        {
            "known": [(user, None) for user in known],
            "active": [(user, active_items[user]) for user in active],
            "unknown": [(f"unknown-{i}", None) for i in range(50)],
        },
        args.floor_calls,
    )

    servable = served.servable_items
    runs = {}
    use_redis = args.redis or args.replicas > 1
    with tempfile.TemporaryDirectory(prefix="shoprec-serve-bench-") as tmp:
        home = Path(tmp)
        redis_process, redis_url = start_redis(home) if use_redis else (None, None)
        env = service_env(home, args.key_file, args.workers, redis_url)
        register_champion(env, args.bundle)
        target = "bench.floor_service:FixedAnswer" if args.floor_service else "."
        servers = [start_server(home, env, str(n), target) for n in range(args.replicas)]
        urls = [url for _, url in servers]
        try:
            for n, (process, url) in enumerate(servers):
                wait_ready(process, url, home / f"serve-{n}.log")
            with httpx.Client(timeout=10) as client:
                for user, item in active_items.items() if not args.floor_service else ():
                    event = {"item_id": item, "event_type": "purchase"}
                    client.post(
                        f"{urls[0]}/events",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"user_id": by_pseudonym[user], "events": [event]},
                    ).raise_for_status()
            locust_env = {
                **os.environ,
                "BENCH_KNOWN_IDS": ",".join(by_pseudonym[user] for user in known),
                "BENCH_ACTIVE_IDS": ",".join(by_pseudonym[user] for user in active),
                "BENCH_MIX": args.mix,
                "BENCH_ITEMS": ",".join(str(item) for item in popular),
                "BENCH_TOKEN": TOKEN,
            }
            for users in args.users:
                runs[str(users)] = run_locust(urls, users, args.run_time, home, locust_env)
            delays = [] if args.floor_service else event_delay(urls, bundle, servable, 5, seed=7)
        finally:
            for process, _ in servers:
                stop_server(process)
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait(timeout=10)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs ran during the benchmark (see load_avg_1m)",
        },
        "mix": {**dict(zip(MIX, map(float, args.mix.split(",")), strict=True)), "k": 10},
        "shoppers": {"known": len(known), "active": len(active)},
        "servers": {
            "replicas": args.replicas,
            "workers_per_replica": args.workers,
            "online_store": "redis" if use_redis else "sqlite",
            "service": "bench/floor_service.py" if args.floor_service else "service.py",
        },
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
        f"servers: {result['servers']}",
        "",
        "| clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | response cache hits"
        " | score cache hits | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for users, run in result["http"].items():
        load = run["load_avg_1m"]
        load_text = f"{min(load):.1f}-{max(load):.1f}" if load else "n/a"
        lines.append(
            f"| {users} | {run['requests']} | {run['errors']} | {run['rps']} | {run['p50_ms']:.1f}"
            f" | {run['p95_ms']:.1f} | {run['p99_ms']:.1f}"
            f" | {run['response_cache']['hit_rate']:.0%} | {run['score_cache']['hit_rate']:.0%}"
            f" | {load_text} |"
        )
    lines += [
        "",
        "| clients | request | requests | errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for users, run in result["http"].items():
        for name, row in run["by_kind"].items():
            p50, p99 = row["p50_ms"], row["p99_ms"]
            lines.append(
                f"| {users} | {name} | {row['requests']} | {row['errors']} | {p50:.1f}"
                f" | {p99:.1f} |"
            )
    lines += [
        "",
        "| in-process floor | call | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for kind, floor in result["in_process_floor"].items():
        for call in ("first", "repeat"):
            row = floor[call]
            lines.append(
                f"| {kind} | {call} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} |"
            )
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
