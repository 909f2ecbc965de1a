"""Seeding the store with the shipped demo sets: new tasks get them, earlier shipped releases move on to the
new one, an admin's own choice is never replaced."""

import json

from fastapi.testclient import TestClient

from app.api.main import create_app
from prompt_store.store import sha256_of
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import input_prompt_set


def _shipped(tmp_path, name: str, data: bytes, earlier: list[bytes] = ()):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "demo.safetensors").write_bytes(data)
    (folder / "releases.json").write_text(json.dumps({"demo": {"earlier_sha256": [sha256_of(b) for b in earlier]}}))
    return folder


def _versions(tmp_path, tiny, seed_dir) -> list[tuple[int, str, bool]]:
    """Start the server on the store at tmp_path/store with this seed folder: (version, sha256, active)."""
    with TestClient(create_app(make_settings(tmp_path, seed_dir=str(seed_dir), warmup=False), loaded=tiny)) as c:
        body = c.get("/admin/prompt-sets/demo", headers=ADMIN).json()
    return [(v["version"], v["sha256"], v["active"]) for v in body["versions"]]


def test_an_earlier_shipped_release_moves_on_to_the_new_one_and_an_admins_choice_stays(tmp_path, tiny):
    old = input_prompt_set(tiny.spec, 3, seed=1).to_bytes(tiny.spec)
    new = input_prompt_set(tiny.spec, 3, seed=2).to_bytes(tiny.spec)
    first, second = _shipped(tmp_path, "v1", old), _shipped(tmp_path, "v2", new, earlier=[old])

    assert _versions(tmp_path, tiny, first) == [(1, sha256_of(old), True)]  # an empty store: seeded
    upgraded = _versions(tmp_path, tiny, second)
    assert upgraded == [(1, sha256_of(old), False), (2, sha256_of(new), True)]
    assert _versions(tmp_path, tiny, second) == upgraded  # once only

    # the admin goes back to the old release: a later start keeps their choice
    with TestClient(create_app(make_settings(tmp_path, seed_dir="", warmup=False), loaded=tiny)) as c:
        assert c.post("/admin/prompt-sets/demo/versions/1/activate", headers=ADMIN).status_code == 200
    assert _versions(tmp_path, tiny, second) == [(1, sha256_of(old), True), (2, sha256_of(new), False)]


def test_a_task_the_admin_uploaded_is_never_replaced(tmp_path, tiny):
    own = input_prompt_set(tiny.spec, 3, seed=3).to_bytes(tiny.spec)
    old = input_prompt_set(tiny.spec, 3, seed=1).to_bytes(tiny.spec)
    new = input_prompt_set(tiny.spec, 3, seed=2).to_bytes(tiny.spec)
    with TestClient(create_app(make_settings(tmp_path, seed_dir="", warmup=False), loaded=tiny)) as c:
        assert c.put("/admin/prompt-sets/demo", content=own,
                     headers={**ADMIN, "Content-Type": "application/octet-stream"}).status_code == 201
    assert _versions(tmp_path, tiny, _shipped(tmp_path, "v2", new, earlier=[old])) == [(1, sha256_of(own), True)]


def test_the_shipped_releases_file_names_the_shipped_sets_and_ships_with_them():
    import tomllib
    from pathlib import Path

    from app.services.seeding import RELEASES_FILE, earlier_releases
    from app.settings import DEMO_PROMPT_SETS

    earlier = earlier_releases(DEMO_PROMPT_SETS)
    shipped = {p.stem: sha256_of(p.read_bytes()) for p in DEMO_PROMPT_SETS.glob("*.safetensors")}
    assert set(earlier) == set(shipped)
    for task, sha in shipped.items():
        assert sha not in earlier[task]  # the current release is not one to move away from
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert RELEASES_FILE in pyproject["tool"]["setuptools"]["package-data"]["app.demo_prompt_sets"]
