"""The object-store backend against a real S3-compatible server (SeaweedFS on loopback, started here):
the file store's semantics, two replicas on one bucket, concurrent writers by compare-and-swap, and the
object store going down and coming back; then two real `promptserve serve` processes on one bucket."""

from __future__ import annotations

import hashlib
import statistics
import threading
import time

import httpx
import pytest

from prompt_store.object_store import ObjectPromptStore, StoreUnavailable
from prompt_store.store import ActiveVersion, IdempotencyConflict, TaskNotFound, VersionNotFound
from tests.helpers import random_deep_prompt_set
from tests.servers import serving


@pytest.fixture
def url(seaweed, request):
    return f"s3://promptsets/{request.node.name.replace('[', '-').replace(']', '')}"


def store(seaweed, url, tmp_path, name="a", poll=0.5) -> ObjectPromptStore:
    return ObjectPromptStore(url, tmp_path / f"cache-{name}", poll, client=seaweed.client())


def blob(tiny_spec, seed: int) -> bytes:
    return random_deep_prompt_set(tiny_spec, 3, seed=seed).to_bytes(tiny_spec)


def test_the_file_stores_semantics(seaweed, url, tmp_path, tiny):
    s = store(seaweed, url, tmp_path)
    one, two = blob(tiny.spec, 1), blob(tiny.spec, 2)
    first = s.put("t", one)
    assert (first.version, first.active, first.created_now) == (1, True, True)
    assert s.put("t", one).created_now is False  # the same bytes again: the stored version
    second = s.put("t", two, idempotency_key="k")
    assert second.version == 2 and s.resolve("t").version == 2
    assert s.put("t", two, idempotency_key="k").version == 2  # a keyed retry
    with pytest.raises(IdempotencyConflict):
        s.put("t", one, idempotency_key="k")
    assert s.activate("t", 1).active and s.resolve("t").version == 1  # rollback
    with pytest.raises(ActiveVersion):
        s.delete_version("t", 1)
    s.delete_version("t", 2)
    with pytest.raises(VersionNotFound):
        s.activate("t", 2)
    assert [v.version for v in s.list_versions("t")] == [1]
    assert s.resolve("t").path.read_bytes() == one and s.resolve("t").sha256 == first.sha256
    s.delete_task("t")
    with pytest.raises(TaskNotFound):
        s.resolve("t")
    assert s.put("t", two).version == 3  # never reused, also across a task delete
    assert s.tasks() == ["t"]


def test_a_slower_thread_never_puts_an_older_manifest_back(seaweed, url, tmp_path, tiny):
    """Two threads of one replica finish in either order: a manifest read before a write (or a write whose
    swap came first) arriving last must not replace the newer one in the cache (the stateful admin test
    found a deleted, acknowledged task still listed for a poll interval that way)."""
    s = store(seaweed, url, tmp_path, poll=60)
    s.put("t", blob(tiny.spec, 1))
    before, _ = s._read_manifest("t")
    s.delete_task("t")
    s._remember("t", before, time.monotonic())  # the slow reader's result lands after the delete
    with pytest.raises(TaskNotFound):
        s.resolve("t")


def test_a_second_replica_serves_an_upload_within_the_poll_interval(seaweed, url, tmp_path, tiny):
    a, b = store(seaweed, url, tmp_path, "a", poll=2.0), store(seaweed, url, tmp_path, "b", poll=2.0)
    a.put("t", blob(tiny.spec, 1))
    assert b.resolve("t").version == 1
    latencies = []
    for seed in range(2, 7):
        version = a.put("t", blob(tiny.spec, seed)).version
        start = time.monotonic()
        while b.resolve("t").version != version:
            assert time.monotonic() - start < 4, "not served by the other replica within the poll interval"
            time.sleep(0.05)
        latencies.append(time.monotonic() - start)
    assert max(latencies) <= 3.0  # the poll interval, and one read of the manifest on a loaded machine


def test_concurrent_writers_on_two_replicas_lose_nothing(seaweed, url, tmp_path, tiny):
    """Compare-and-swap on the manifest: 12 uploads from 4 threads on 2 replicas get 12 distinct numbers."""
    replicas = [store(seaweed, url, tmp_path, name) for name in ("a", "b")]
    replicas[0].put("t", blob(tiny.spec, 100))
    got, errors = [], []

    def upload(k):
        try:
            for j in range(3):
                got.append(replicas[k % 2].put("t", blob(tiny.spec, 10 * k + j)).version)
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)
    threads = [threading.Thread(target=upload, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == list(range(2, 14))
    # what the bucket holds, read by a replica with no cache (the two above may be up to a poll interval old)
    fresh = store(seaweed, url, tmp_path, "fresh")
    assert [v.version for v in fresh.list_versions("t")] == list(range(1, 14))


def test_the_object_store_down_and_back(seaweed, url, tmp_path, tiny):
    s = store(seaweed, url, tmp_path, poll=0.2)
    s.put("t", blob(tiny.spec, 1))
    assert s.resolve("t").version == 1
    seaweed.stop()
    try:
        time.sleep(0.3)  # past the poll interval: the next read goes to the store, which is gone
        assert s.resolve("t").version == 1  # served from the cache
        assert s.tasks() == ["t"]
        with pytest.raises(StoreUnavailable):
            s.put("t", blob(tiny.spec, 2))
    finally:
        seaweed.start()
    assert s.put("t", blob(tiny.spec, 2)).version == 2  # recovered by itself


@pytest.mark.real_model
def test_two_servers_on_one_bucket(seaweed, url, tmp_path, tiny, tiny_model_dir):
    """Two `promptserve serve` processes (the tiny model) on one bucket: an upload through one is served by
    the other within 2 s (measured over 20 uploads); with the object store killed under load, /v1 keeps
    answering from the cache and admin writes answer 503, then recover by themselves once it is restarted."""
    env = {**seaweed.env, "PROMPTSERVE_STORE_URL": url, "PROMPTSERVE_MODEL": str(tiny_model_dir),
           "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "", "PROMPTSERVE_ADMIN_TOKEN": "t",
           "PROMPTSERVE_STORE_DIR": str(tmp_path / "cache-1")}
    admin = {"Authorization": "Bearer t", "content-type": "application/octet-stream"}
    with serving(env) as one, serving({**env, "PROMPTSERVE_STORE_DIR": str(tmp_path / "cache-2")}) as two:
        latencies = []
        for seed in range(20):
            r = httpx.put(f"{one}/admin/prompt-sets/shared", content=blob(tiny.spec, 1000 + seed), headers=admin,
                          timeout=30)
            assert r.status_code == 201, r.text
            version, start = r.json()["version"], time.monotonic()
            while True:
                got = httpx.post(f"{two}/v1/tasks/shared", json={"prompt": "x", "max_tokens": 1}, timeout=30)
                if got.status_code == 200 and got.json()["prompt_set"]["version"] == version:
                    break
                assert time.monotonic() - start < 3, got.text
                time.sleep(0.05)
            latencies.append(time.monotonic() - start)
        assert max(latencies) <= 2.0, latencies
        print(f"upload -> other replica serving it: p50 {statistics.median(latencies):.2f} s, "
              f"max {max(latencies):.2f} s over {len(latencies)}")
        # load on both replicas through the whole outage: before, during and after it
        served: list[int] = []
        stop_load = threading.Event()

        def load(base):
            while not stop_load.is_set():
                served.append(httpx.post(f"{base}/v1/tasks/shared", json={"prompt": "x", "max_tokens": 1},
                                         timeout=30).status_code)
        loaders = [threading.Thread(target=load, args=(b,)) for b in (one, two)]
        [t.start() for t in loaders]
        try:
            time.sleep(0.5)
            seaweed.kill()  # killed mid-load, then restarted on its data
            try:
                time.sleep(2.5)  # past the poll interval: every read now finds the store gone
                during = len(served)
                refused = httpx.put(f"{one}/admin/prompt-sets/shared", content=blob(tiny.spec, 5000),
                                    headers=admin, timeout=60)
            finally:
                seaweed.start()
            again = httpx.put(f"{one}/admin/prompt-sets/shared", content=blob(tiny.spec, 5000), headers=admin,
                              timeout=30)
            time.sleep(1.5)
        finally:
            stop_load.set()
            [t.join() for t in loaders]
        assert during >= 4 and len(served) > during, (during, len(served))
        assert set(served) == {200}, {code: served.count(code) for code in set(served)}
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert refused.headers.get("retry-after")
        assert again.status_code == 201  # recovered by itself, nothing restarted but the object store
        print(f"object store down: {len(served)} /v1 requests all 200; admin upload {refused.status_code} "
              f"{refused.json()['error']['message']!r}, then {again.status_code} once it was back")


@pytest.mark.real_model
def test_kill_9_mid_upload_loses_nothing_acknowledged(seaweed, url, tmp_path, tiny, tiny_model_dir):
    """A server killed with SIGKILL while uploads stream in: every version that was answered 201 before the
    kill is there, with its bytes, on a server started afresh on the bucket."""
    import signal

    from tests.servers import free_port, spawn, stop, wait_ready

    env = {**seaweed.env, "PROMPTSERVE_STORE_URL": url, "PROMPTSERVE_MODEL": str(tiny_model_dir),
           "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "", "PROMPTSERVE_ADMIN_TOKEN": "t",
           "PROMPTSERVE_STORE_DIR": str(tmp_path / "cache-k")}
    admin = {"Authorization": "Bearer t", "content-type": "application/octet-stream"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn(env, port)
    acknowledged: dict[int, str] = {}
    try:
        wait_ready(base, proc)
        done = threading.Event()

        def uploads():
            seed = 0
            while not done.is_set():
                seed += 1
                try:
                    r = httpx.put(f"{base}/admin/prompt-sets/k9", content=blob(tiny.spec, 7000 + seed), headers=admin,
                                  timeout=10)
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    acknowledged[r.json()["version"]] = r.json()["sha256"]
        writer = threading.Thread(target=uploads)
        writer.start()
        time.sleep(4)
        proc.send_signal(signal.SIGKILL)  # mid-stream of uploads, no drain
        proc.wait(10)
        done.set()
        writer.join(20)
    finally:
        stop(proc)
    assert len(acknowledged) >= 3, acknowledged
    fresh = ObjectPromptStore(url, tmp_path / "cache-fresh", client=seaweed.client())
    stored = {v.version: v.sha256 for v in fresh.list_versions("k9")}
    missing = {v: sha for v, sha in acknowledged.items() if stored.get(v) != sha}
    assert not missing, f"acknowledged but lost: {missing}"
    for v in acknowledged:
        info = next(i for i in fresh.list_versions("k9") if i.version == v)
        assert hashlib.sha256(info.path.read_bytes()).hexdigest() == info.sha256
