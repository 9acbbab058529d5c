"""Prefect flow ``train``: run the DVC pipeline, register the model, gate and promote it.

Run it with ``shoprec train``, ``python flows/train.py`` or a deployment from prefect.yaml.
With no ``PREFECT_API_URL`` set, a plain call starts a temporary local Prefect API.
"""

from __future__ import annotations

import json
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shoprec import registry
from shoprec.config import load_params, params_section
from shoprec.exceptions import ShoprecError
from shoprec.report import VARIANTS, metrics_table

DEFAULT_REPRO_CMD = ("dvc", "repro")
MODEL_DIR = Path("artifacts/model")
METRICS_FILE = Path("reports/metrics.json")
PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("data.dvc")
DVC_PIPELINE_FILE = Path("dvc.yaml")
BUNDLE_METADATA_FILE = "metadata.json"
OUTPUT_TAIL_LINES = 20


class TrainError(ShoprecError):
    """The training pipeline failed."""


# Every task reads or changes state outside its inputs (files, the model store), so a result
# cached from an earlier run would be stale even when persisting results is switched on.


@task(name="repro", cache_policy=NO_CACHE)
def repro(project_dir: Path, command: list[str]) -> None:
    """Run the DVC pipeline in ``project_dir`` and log its output line by line."""
    logger = get_run_logger()
    logger.info("running %s in %s", " ".join(command), project_dir)

    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command,
        cwd=project_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            logger.info("%s", line)
        returncode = process.wait()

    if returncode != 0:
        raise TrainError(
            f"'{' '.join(command)}' failed with exit code {returncode} in {project_dir}; "
            "its last output lines:\n" + "\n".join(tail)
        )


@task(name="load_metrics", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def load_metrics(metrics_file: Path) -> dict[str, Any]:
    """Read the metrics written by the evaluate stage."""
    return registry.load_metrics(metrics_file)


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(model_dir: Path, metrics: dict[str, Any], metadata: dict[str, Any]) -> str:
    """Copy the trained bundle into the BentoML store as a challenger; return its tag."""
    model = registry.register_challenger(model_dir, metrics, metadata)
    get_run_logger().info("registered challenger %s", model.tag)
    return str(model.tag)


@task(name="gate", cache_policy=NO_CACHE)
def gate(
    tag: str,
    metrics: dict[str, Any],
    config: registry.GateConfig,
    training_window: dict[str, str] | None = None,
) -> registry.GateDecision:
    """Compare the challenger with the champion and promote it when it passes.

    Metrics are only comparable on the same test window, which follows the end of the
    training window. When the champion was evaluated on another window (a retrain on newer
    data), the challenger must still beat every baseline scored on its own window, but the
    champion's older numbers are not used.
    """
    logger = get_run_logger()
    champion = registry.get_champion()
    champion_metrics = champion.info.metadata.get("metrics") if champion is not None else None
    champion_window = champion.info.metadata.get("training_window") if champion else None
    champion_end = (champion_window or {}).get("end")
    challenger_end = (training_window or {}).get("end")
    other_window = champion_metrics is not None and champion_end != challenger_end
    if other_window:
        logger.info(
            "gate: champion %s was evaluated on the window after %s, the challenger on the "
            "window after %s; comparing the challenger with the baselines only",
            champion.tag,
            champion_end,
            challenger_end,
        )
        champion_metrics = None

    decision = registry.decide_promotion(
        metrics,
        champion_metrics,
        config.margin,
        metric=config.metric,
        variants=config.variants,
    )
    if other_window:
        decision.reasons[:] = [
            f"champion {champion.tag} was evaluated on another window; compared with the "
            "baselines only"
            if reason == "no champion registered yet"
            else reason
            for reason in decision.reasons
        ]
    for reason in decision.reasons:
        logger.info("gate: %s", reason)

    previous = str(champion.tag) if champion is not None else "none"
    if decision.promote:
        registry.promote(tag)
        logger.info("promoted %s to champion; previous champion: %s", tag, previous)
    else:
        registry.reject(tag)
        logger.warning("%s failed the gate; the champion is still %s", tag, previous)
    return decision


@flow(name="train", log_prints=False)
def train(
    project_dir: Path = Path("."),
    force: bool = False,
    repro_cmd: list[str] | None = None,
) -> dict[str, Any]:
    """Train with ``dvc repro``, register the model and promote it if it passes the gate.

    ``force`` adds ``--force`` to the default ``dvc repro`` command; a custom ``repro_cmd``
    runs as given, in ``project_dir``.
    """
    logger = get_run_logger()
    project_dir = project_dir.resolve()
    if repro_cmd:
        command = list(repro_cmd)
    else:
        command = [*DEFAULT_REPRO_CMD, "--force"] if force else list(DEFAULT_REPRO_CMD)

    params = load_params(project_dir / PARAMS_FILE)
    gate_config = registry.GateConfig.model_validate(params_section(params, "gate"))

    repro(project_dir, command)
    metrics = load_metrics(project_dir / METRICS_FILE)
    for variant in VARIANTS:
        if variant in metrics:
            table = metrics_table(metrics[variant]).to_string(float_format="{:.4f}".format)
            logger.info("metrics, variant %s:\n%s", variant, table)

    # A bundle that is already registered (dvc repro changed nothing) is not registered twice.
    model_dir = project_dir / MODEL_DIR
    fingerprint = registry.bundle_fingerprint(model_dir)
    existing = registry.find_registered(fingerprint)
    if existing is not None:
        stage = existing.info.labels.get(registry.STAGE_LABEL)
        logger.info("bundle already registered as %s (%s); nothing to do", existing.tag, stage)
        return {
            "model_tag": str(existing.tag),
            "promoted": stage == registry.CHAMPION,
            "reasons": [f"bundle already registered as {existing.tag} ({stage})"],
            "metrics": metrics,
        }

    metadata = registry.build_metadata(
        data_version=registry.read_data_version(project_dir / DVC_FILE),
        params=registry.select_pipeline_params(params, _read_yaml(project_dir / DVC_PIPELINE_FILE)),
        metrics=metrics,
        training_window=read_training_window(model_dir),
    )
    metadata["bundle_sha256"] = fingerprint
    tag = register(model_dir, metrics, metadata)
    decision = gate(tag, metrics, gate_config, metadata.get("training_window"))

    logger.info("model %s promoted=%s", tag, decision.promote)
    return {
        "model_tag": tag,
        "promoted": decision.promote,
        "reasons": decision.reasons,
        "metrics": metrics,
    }


def read_training_window(model_dir: Path) -> dict[str, str] | None:
    """Read ``training_window`` from the bundle's metadata.json, or None when absent."""
    metadata_file = model_dir / BUNDLE_METADATA_FILE
    if not metadata_file.exists():
        return None
    with metadata_file.open(encoding="utf-8") as handle:
        window = json.load(handle).get("training_window")
    return {str(k): str(v) for k, v in window.items()} if isinstance(window, dict) else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


if __name__ == "__main__":
    train()
