import os
import threading

import pytest

from prompt_store import PromptStore, StoreError, TaskNotFound
from prompt_store.store import VersionNotFound
from tests.helpers import input_prompt_set


@pytest.fixture
def data(tiny):
    return [input_prompt_set(tiny.spec, 3, seed=i).to_bytes(tiny.spec) for i in range(3)]


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
        results.append(s.put("t", data[i % 3]).version)

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
