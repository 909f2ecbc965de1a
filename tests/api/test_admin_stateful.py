"""Stateful property test of the prompt-set store through the admin API, against a simple model, on both
backends: the file store and the object store (a real SeaweedFS on loopback).

Rules: upload (with or without an idempotency key), activate, delete a version, delete a task, two of
these at once from two threads, and a simulated crash (a kill between any two file operations of an
upload or a task delete) followed by a restart of the store: a new store object on the same directory or
bucket, with an empty cache. After every step: the listing equals the
model, version numbers were never reused, and what a request is served is exactly the active bytes (its
greedy output equals that of the same bytes uploaded under a reference name).

Bounded in CI; PROMPTSERVE_STATEFUL_EXAMPLES=N runs a longer search.
"""

import os
import tempfile
import threading

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from app.api.main import create_app
from prompt_store import PromptStore
from prompt_store.object_store import ObjectPromptStore
from prompt_store.store import sha256_of
from tests.api.conftest import ADMIN, make_settings
from tests.helpers import input_prompt_set

TASKS = ("a", "b")
N_DATA = 5
EXAMPLES = int(os.environ.get("PROMPTSERVE_STATEFUL_EXAMPLES", "12"))


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so no handler of the server can swallow it."""


@pytest.fixture(scope="module", params=["file", "s3"])
def world(request, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("stateful")
    with pytest.MonkeyPatch.context() as env:
        if request.param == "s3":
            seaweed = request.getfixturevalue("seaweed")
            for name, value in seaweed.env.items():
                env.setenv(name, value)
            settings = make_settings(root, store_url=f"s3://promptsets/stateful-{root.name}")
        else:
            settings = make_settings(root)
        yield from _world(settings, tiny)


def _world(settings, tiny):
    with TestClient(create_app(settings, loaded=tiny)) as client:
        datas = [input_prompt_set(tiny.spec, 2 + i, seed=i, scale=1.0).to_bytes(tiny.spec) for i in range(N_DATA)]
        expected = {}
        for i, data in enumerate(datas):
            assert client.put(f"/admin/prompt-sets/ref{i}", content=data, headers=ADMIN).status_code == 201
            expected[sha256_of(data)] = _served(client, f"ref{i}")
        assert len(set(expected.values())) == N_DATA, "reference outputs must tell the sets apart"
        yield client, datas, expected


def _served(client, task):
    r = client.post(f"/v1/tasks/{task}", json={"prompt": "Say", "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["text"]


class AdminMachine(RuleBasedStateMachine):
    world = None  # (client, datas, expected): set by the test below

    def __init__(self):
        super().__init__()
        self.client, self.datas, self.expected = self.world
        for task in TASKS:
            self.client.delete(f"/admin/prompt-sets/{task}", headers=ADMIN)
        # model: task -> {"versions": {version: sha}, "active": version}; issued: every number seen per task
        self.model: dict[str, dict] = {}
        self.issued = {t: set(self._listing(t)[1]) if self._listing(t) else set() for t in TASKS}
        self.keys: dict[str, str] = {}  # idempotency key -> sha it was used with

    # -- helpers ---------------------------------------------------------------------------------
    def _listing(self, task):
        r = self.client.get(f"/admin/prompt-sets/{task}", headers=ADMIN)
        if r.status_code == 404:
            return None
        body = r.json()
        return body["active_version"], {v["version"]: v["sha256"] for v in body["versions"]}

    def _new_version(self, task, version):
        assert version not in self.issued[task] and version > max(self.issued[task], default=0), (
            f"version {version} of {task} reused (issued {sorted(self.issued[task])})")
        self.issued[task].add(version)

    def _apply_upload(self, task, idx, response, key=None):
        sha = sha256_of(self.datas[idx])
        assert response.status_code in (200, 201), response.text
        body = response.json()
        assert body["sha256"] == sha and body["active"]
        state = self.model.setdefault(task, {"versions": {}, "active": None})
        if response.status_code == 201:
            self._new_version(task, body["version"])
        else:
            assert state["versions"].get(body["version"]) == sha
        state["versions"][body["version"]] = sha
        state["active"] = body["version"]
        if key:
            self.keys[key] = sha

    def _pick(self, task, pick):
        """(the task's model state, a stored version of it, or mostly so: one in four is a missing one)."""
        state = self.model.get(task)
        versions = sorted(state["versions"]) if state else []
        return state, versions[pick % len(versions)] if versions and pick < 8 else pick + 1000

    def _forget(self, task):
        self.model.pop(task, None)
        self._forget_keys(task)

    def _forget_keys(self, task):
        """A deleted task's idempotency keys go with it."""
        self.keys = {k: v for k, v in self.keys.items() if not k.startswith((f"{task}-", f"crash-{task}-"))}

    def _restart_store(self):
        """A new process on the same directory (start-up recovery runs) or bucket (with an empty cache)."""
        service = self.client.app.state.tasks
        old = service.store
        if isinstance(old, PromptStore):
            new = PromptStore(old.root)
        else:
            new = ObjectPromptStore(f"s3://{old.bucket}/{old.prefix}", tempfile.mkdtemp(dir=old.cache_dir.parent),
                                    old.poll_seconds)
        service.store = self.client.app.state.store = new

    # -- rules -----------------------------------------------------------------------------------
    @rule(task=st.sampled_from(TASKS), idx=st.integers(0, N_DATA - 1), key=st.sampled_from([None, "k1", "k2"]))
    def upload(self, task, idx, key):
        headers = {**ADMIN, **({"Idempotency-Key": f"{task}-{key}"} if key else {})}
        r = self.client.put(f"/admin/prompt-sets/{task}", content=self.datas[idx], headers=headers)
        if key and self.keys.get(f"{task}-{key}") not in (None, sha256_of(self.datas[idx])):
            assert r.status_code == 422
            return
        self._apply_upload(task, idx, r, f"{task}-{key}" if key else None)

    @rule(task=st.sampled_from(TASKS), pick=st.integers(0, 10))
    def activate(self, task, pick):
        state, version = self._pick(task, pick)
        r = self.client.post(f"/admin/prompt-sets/{task}/versions/{version}/activate", headers=ADMIN)
        if state and version in state["versions"]:
            assert r.status_code == 200 and r.json()["active"]
            state["active"] = version
        else:
            assert r.status_code == 404, r.text

    @rule(task=st.sampled_from(TASKS), pick=st.integers(0, 10))
    def delete_version(self, task, pick):
        state, version = self._pick(task, pick)
        r = self.client.delete(f"/admin/prompt-sets/{task}/versions/{version}", headers=ADMIN)
        if state and version == state["active"]:
            assert r.status_code == 409
        elif state and version in state["versions"]:
            assert r.status_code == 204
            del state["versions"][version]
        else:
            assert r.status_code == 404

    @rule(task=st.sampled_from(TASKS))
    def delete_task(self, task):
        r = self.client.delete(f"/admin/prompt-sets/{task}", headers=ADMIN)
        assert r.status_code == (204 if task in self.model else 404)
        self._forget(task)

    @rule(task=st.sampled_from(TASKS), idx=st.integers(0, N_DATA - 1), point=st.integers(0, 5))
    def upload_killed_then_retried(self, task, idx, point):
        """A kill mid-upload (the client saw no answer), a restart, and the client's keyed retry."""
        key = f"crash-{task}-{idx}"
        if self.keys.get(key) not in (None, sha256_of(self.datas[idx])):
            return
        store = self.client.app.state.store
        step = store.UPLOAD_CRASH_POINTS[point % len(store.UPLOAD_CRASH_POINTS)]

        def crash(at):
            if at == step:
                raise Killed(at)
        store.crash_point = crash
        try:  # the service as the route calls it (a kill must not cross the test client's event loop)
            info = self.client.app.state.tasks.upload(task, self.datas[idx], key)
        except Killed:
            info = None
        finally:
            store.crash_point = lambda at: None
        if info is not None:  # not killed: the bytes were stored already (key or newest), it only activated
            assert not info.created_now and self.model[task]["versions"][info.version] == info.sha256
            self.model[task]["active"] = info.version
        self._restart_store()
        if task in self.model:  # nothing visible changed: the old active version still serves
            assert self._listing(task)[0] == self.model[task]["active"]
        else:
            assert self._listing(task) is None
        r = self.client.put(f"/admin/prompt-sets/{task}", content=self.datas[idx],
                            headers={**ADMIN, "Idempotency-Key": key})
        if r.status_code == 201 and step == "linked" and task in self.model:
            pytest.fail("the retry stored a duplicate of a version the killed upload had stored")
        if r.status_code == 200 and r.json()["version"] not in self.model.get(task, {"versions": {}})["versions"]:
            self._new_version(task, r.json()["version"])  # the version the killed upload stored, now active
            self.model.setdefault(task, {"versions": {}, "active": None})["versions"][r.json()["version"]] = \
                r.json()["sha256"]
        self._apply_upload(task, idx, r, key)
        # numbers skipped by the kill are not reused either: record what the store issued
        self.issued[task] |= set(self._listing(task)[1])

    # no precondition on the model and no draws from it: two_at_once makes the model depend on thread
    # timing, and Hypothesis needs the same draws when it replays a case
    @rule(task=st.sampled_from(TASKS))
    def delete_task_killed(self, task):
        if task not in self.model:
            return
        store = self.client.app.state.store

        def crash(at):
            raise Killed(at)
        store.crash_point = crash
        try:
            with pytest.raises(Killed):
                self.client.app.state.tasks.delete_task(task)
        finally:
            store.crash_point = lambda at: None
        self._restart_store()
        assert self._listing(task) is None  # the delete had taken effect: the task is gone, and stays gone
        self._forget(task)

    @rule(task=st.sampled_from(TASKS), first=st.sampled_from(["upload", "activate", "delete_version", "delete_task"]),
          second=st.sampled_from(["upload", "activate", "delete_version", "delete_task"]),
          i=st.integers(0, N_DATA - 1), j=st.integers(0, N_DATA - 1))
    def two_at_once(self, task, first, second, i, j):
        """Two admin operations on one task from two threads: the result is one of the two serial orders."""
        state = self.model.get(task)
        versions = sorted(state["versions"]) if state else []
        target = versions[0] if versions else 1

        def call(op, idx):
            if op == "upload":
                return self.client.put(f"/admin/prompt-sets/{task}", content=self.datas[idx], headers=ADMIN)
            if op == "activate":
                return self.client.post(f"/admin/prompt-sets/{task}/versions/{target}/activate", headers=ADMIN)
            if op == "delete_version":
                return self.client.delete(f"/admin/prompt-sets/{task}/versions/{target}", headers=ADMIN)
            return self.client.delete(f"/admin/prompt-sets/{task}", headers=ADMIN)

        results = [None, None]
        threads = [threading.Thread(target=lambda k, op, idx: results.__setitem__(k, call(op, idx)), args=a)
                   for a in ((0, first, i), (1, second, j))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for r in results:
            assert r.status_code < 500, r.text
        # the model follows what the server says it did; the invariants check that it is consistent
        listing = self._listing(task)
        if "delete_task" in (first, second):  # keys may be gone whatever the order was
            self._forget_keys(task)
        if listing is None:
            self._forget(task)
            return
        active, stored = listing
        for version in sorted(set(stored) - set(self.model.get(task, {"versions": {}})["versions"])):
            self._new_version(task, version)
        self.model[task] = {"versions": dict(stored), "active": active}
        assert active in stored

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def listing_and_serving_match_the_model(self):
        for task in TASKS:
            listing = self._listing(task)
            if task not in self.model:
                assert listing is None, (task, listing)
                assert self.client.post(f"/v1/tasks/{task}", json={"prompt": "x"}).status_code == 404
                continue
            state = self.model[task]
            assert listing == (state["active"], state["versions"]), (task, listing, state)
            assert _served(self.client, task) == self.expected[state["versions"][state["active"]]]


def test_admin_api_against_a_model(world):
    AdminMachine.world = world
    AdminMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=15, deadline=None,
                                              suppress_health_check=list(HealthCheck))
    AdminMachine.TestCase().runTest()
