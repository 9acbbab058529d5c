"""`bentoml build` of the project, and `bentoml serve` of the built Bento, in a temporary store.

BENTOML_HOME points at a temporary directory holding the registered champion, so neither the
build nor the serve touches the user's ~/bentoml. Package indexes are switched off, because the
build must work offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.serving_bundle import (
    PROJECT_ROOT,
    bentoml_serve,
    register_champion,
    service_env,
    shared_bundle,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUILD_TIMEOUT_S = 300


def run_bentoml(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def built(landing_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    trained = shared_bundle(landing_dir, tmp_path_factory)
    home = tmp_path_factory.mktemp("bentoml_build_home")
    env = {**service_env(home), "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}
    champion = register_champion(trained.directory, env)

    build = run_bentoml(["build"], env, PROJECT_ROOT)
    if build.returncode != 0:
        pytest.fail(f"bentoml build failed:\n{build.stdout[-2000:]}\n{build.stderr[-3000:]}")
    listing = run_bentoml(["get", "shoprec:latest", "-o", "json"], env, home)
    if listing.returncode != 0:
        pytest.fail(f"bentoml get failed:\n{listing.stderr[-3000:]}")
    yield {"home": home, "env": env, "champion": champion, "info": json.loads(listing.stdout)}


def test_build_lists_champion_model(built: dict) -> None:
    info = built["info"]

    models = [model["tag"] for service in info["services"] for model in service["models"]]
    assert info["name"] == "shoprec"
    assert info["service"] == "service:Shoprec"
    assert models == [built["champion"]]


def test_build_writes_into_temporary_home(built: dict) -> None:
    bento_dir = built["home"] / "bentos" / "shoprec" / built["info"]["version"]

    assert (bento_dir / "bento.yaml").is_file()
    assert (bento_dir / "src" / "service.py").is_file()
    assert (bento_dir / "src" / "params.yaml").is_file()
    assert (bento_dir / "src" / "shoprec" / "serving.py").is_file()
    assert f"tag: {built['champion']}" in (bento_dir / "bento.yaml").read_text()


def test_built_bento_serves_recommendations(built: dict, tmp_path: Path) -> None:
    tag = f"shoprec:{built['info']['version']}"
    # The Bento runs from its own copy of the code and params.yaml, and without a token.
    env = dict(built["env"])
    for name in ("PYTHONPATH", "SHOPREC_PARAMS_FILE", "SHOPREC_API_TOKEN"):
        env.pop(name)

    with bentoml_serve(tag, env, tmp_path / "serve.log", tmp_path) as url:
        recommended = httpx.post(f"{url}/recommend", json={"user_id": "visitor", "k": 3})
        events = httpx.post(
            f"{url}/events",
            json={"user_id": "visitor", "events": [{"item_id": "85123A", "event_type": "view"}]},
        )

    assert recommended.status_code == 200
    assert recommended.json()["model_version"] == built["champion"]
    assert len(recommended.json()["items"]) == 3
    assert events.status_code == 403
    assert "SHOPREC_API_TOKEN is not set" in events.json()["error"]
    assert "SHOPREC_API_TOKEN is not set" in (tmp_path / "serve.log").read_text()
