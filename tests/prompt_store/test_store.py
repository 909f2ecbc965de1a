import os
import threading

import pytest

from prompt_store import PromptStore, StoreError, TaskNotFound
from prompt_store.store import VersionNotFound
from tests.helpers import input_prompt_set


@pytest.fixture
def data(tiny):
    return [input_prompt_set(tiny.spec, 3, seed=i).to_bytes(tiny.spec) for i in range(12)]


def test_versions_activation_and_rollback(tmp_path, data):
    store = PromptStore(tmp_path)
    assert store.put("spam", data[0]).version == 1
    assert store.put("spam", data[1]).version == 2
    assert store.resolve("spam").version == 2
    store.activate("spam", 1)
    assert store.resolve("spam").version == 1
    assert [v.version for v in store.list_versions("spam")] == [1, 2]
    assert store.tasks() == ["spam"]


def test_unknown_and_invalid_names(tmp_path, data):
    store = PromptStore(tmp_path)
    with pytest.raises(TaskNotFound):
        store.resolve("nope")
    for bad in ["../x", "", "a/b", ".hidden", "x" * 65]:
        with pytest.raises(StoreError):
            store.put(bad, data[0])
    store.put("t", data[0])
    with pytest.raises(VersionNotFound):
        store.activate("t", 9)


def test_active_version_cannot_be_deleted_and_task_delete_is_whole(tmp_path, data):
    store = PromptStore(tmp_path)
    store.put("t", data[0])
    store.put("t", data[1])
    with pytest.raises(StoreError, match="active"):
        store.delete_version("t", 2)
    store.delete_version("t", 1)
    assert store.versions("t") == [2]
    store.delete_task("t")
    with pytest.raises(TaskNotFound):
        store.resolve("t")


def test_concurrent_writers_never_share_a_version(tmp_path, data):
    stores = [PromptStore(tmp_path) for _ in range(4)]  # as if four processes shared the directory
    results = []

    def upload(s, i):
        results.append(s.put("t", data[i]).version)

    threads = [threading.Thread(target=upload, args=(stores[i % 4], i)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == list(range(1, 13))


def test_crash_leftovers_do_not_change_state(tmp_path, data):
    store = PromptStore(tmp_path)
    store.put("t", data[0])
    # a writer that died after writing its temp file but before linking it
    (tmp_path / "tasks" / "t" / ".tmp-dead").write_bytes(data[1][:10])
    assert store.versions("t") == [1] and store.resolve("t").version == 1
    # a task whose first version was written but never activated does not exist yet
    os.makedirs(tmp_path / "tasks" / "half")
    (tmp_path / "tasks" / "half" / "v000001.safetensors").write_bytes(data[0])
    assert store.tasks() == ["t"]


def test_version_numbers_are_never_reused_across_deletes(tmp_path, data):
    store = PromptStore(tmp_path)
    first = store.put("t", data[0])
    store.delete_task("t")
    again = store.put("t", data[1])
    assert again.version == 2 and again.sha256 != first.sha256
    store.put("t", data[2])  # v3
    store.activate("t", 2)
    store.delete_version("t", 3)  # the highest, not active
    assert store.put("t", data[3]).version == 4
    assert PromptStore(tmp_path).put("t", data[4]).version == 5  # a restarted process continues too


def test_same_bytes_or_idempotency_key_return_the_stored_version(tmp_path, data):
    store = PromptStore(tmp_path)
    a = store.put("t", data[0], idempotency_key="k1")
    assert a.created_now and a.version == 1
    retry = store.put("t", data[0], idempotency_key="k1")
    assert (retry.version, retry.created_now, retry.active) == (1, False, True)
    assert store.put("t", data[0]).version == 1  # the same bytes again in a row: no duplicate
    b = store.put("t", data[1], idempotency_key="k2")
    assert b.version == 2
    with pytest.raises(StoreError, match="other bytes"):
        store.put("t", data[2], idempotency_key="k1")
    # a retry of an older upload whose key is known returns that version and makes it active again
    again = store.put("t", data[0], idempotency_key="k1")
    assert again.version == 1 and store.resolve("t").version == 1
    assert store.versions("t") == [1, 2]


@pytest.mark.parametrize("step", ["claimed", "written", "linked"])
def test_a_crash_mid_upload_leaves_the_old_state_and_a_keyed_retry_completes_it(tmp_path, data, monkeypatch, step):
    store = PromptStore(tmp_path)
    store.put("t", data[0])

    def crash(at):
        if at == step:
            raise KeyboardInterrupt(f"killed at {at}")  # not an Exception: nothing may catch it
    monkeypatch.setattr(PromptStore, "crash_point", staticmethod(crash))
    with pytest.raises(KeyboardInterrupt):
        store.put("t", data[1], idempotency_key="retry-me")
    monkeypatch.setattr(PromptStore, "crash_point", staticmethod(lambda at: None))
    restarted = PromptStore(tmp_path)  # start-up removes the killed writer's leftovers
    assert not list((tmp_path / "tasks" / "t").glob(".tmp-*"))
    assert restarted.resolve("t").version == 1
    info = restarted.put("t", data[1], idempotency_key="retry-me")
    assert restarted.resolve("t").sha256 == info.sha256
    assert len([v for v in restarted.list_versions("t") if v.sha256 == info.sha256]) == 1


def test_activate_racing_delete_never_leaves_a_dangling_pointer(tmp_path, data):
    stores = [PromptStore(tmp_path) for _ in range(2)]
    stores[0].put("t", data[0])
    for round_ in range(40):
        v = stores[0].put("t", data[1 + round_ % 10]).version
        stores[0].activate("t", 1)
        barrier = threading.Barrier(2)

        def activate():
            barrier.wait()
            try:
                stores[0].activate("t", v)
            except VersionNotFound:
                pass

        def delete():
            barrier.wait()
            try:
                stores[1].delete_version("t", v)
            except StoreError:
                pass  # it became active first
        threads = [threading.Thread(target=activate), threading.Thread(target=delete)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        active = stores[1].resolve("t")  # raises if ACTIVE names a deleted file
        assert active.version in stores[1].versions("t")
        if active.version != 1:
            stores[0].activate("t", 1)
            stores[0].delete_version("t", v)


def test_upload_racing_task_delete_ends_in_a_consistent_state(tmp_path, data):
    for i in range(20):
        store = PromptStore(tmp_path / str(i))
        store.put("t", data[0])
        errors = []

        def upload():
            try:
                store.put("t", data[1])
            except Exception as exc:
                errors.append(exc)

        def delete():
            try:
                store.delete_task("t")
            except TaskNotFound:
                pass
        threads = [threading.Thread(target=upload), threading.Thread(target=delete)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors
        if store.exists("t"):
            assert store.resolve("t").sha256 == store.info("t", store.versions("t")[-1]).sha256


def test_absurd_version_numbers_are_not_found(tmp_path, data):
    store = PromptStore(tmp_path)
    store.put("t", data[0])
    for bad in (10**300, 0, -1):
        with pytest.raises(VersionNotFound):
            store.activate("t", bad)
        with pytest.raises(VersionNotFound):
            store.delete_version("t", bad)
