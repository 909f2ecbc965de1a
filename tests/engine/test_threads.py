"""Threads sized from what the process may use: affinity, capped by the cgroup's CPU quota."""

import os

import pytest

from app.engine import threads


def _cgroup(tmp_path, v2=None, v1=None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


@pytest.mark.parametrize("v2, v1, quota", [
    ("max 100000\n", None, None),
    ("250000 100000\n", None, 2.5),
    ("50000 100000\n", None, 0.5),
    (None, ("-1\n", "100000\n"), None),
    (None, ("300000\n", "100000\n"), 3.0),
    (None, None, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, v2, v1, quota):
    assert threads.cgroup_cpu_quota(_cgroup(tmp_path, v2, v1)) == quota


def test_usable_cpus_is_the_affinity_capped_by_whole_quota_cpus(tmp_path):
    mine = len(os.sched_getaffinity(0))

    def usable(name, cpu_max):
        (tmp_path / name).mkdir()
        return threads.usable_cpus(_cgroup(tmp_path / name, cpu_max))
    assert usable("unlimited", "max 100000") == mine
    assert usable("one", "100000 100000") == 1
    assert usable("half", "50000 100000") == 1  # never zero
    assert usable("big", "6400000 100000") == mine  # a quota above the mask: the mask


def test_size_threads_sets_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.size_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
        assert threads.size_threads(0) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _governor(cpu_per_second, usable=2):
    """A governor whose process gets cpu_per_second(t) CPU seconds per wall second at time t."""
    state = {"wall": 0.0, "cpu": 0.0}
    set_to = []
    gov = threads.ThreadGovernor(usable, window=0.5, calm_seconds=1.0, cpu_clock=lambda: state["cpu"],
                                 wall_clock=lambda: state["wall"], set_threads=set_to.append)

    def run(seconds, step=0.1):
        for _ in range(int(round(seconds / step))):
            gov.between_steps()
            state["cpu"] += cpu_per_second(state["wall"], gov.threads) * step
            state["wall"] += step
    return gov, run, set_to


def test_governor_gives_up_a_thread_to_busy_neighbours_and_takes_it_back_once_they_stop():
    # two busy neighbours on two cores until t=3: 2 threads get 1 CPU, 1 thread 2/3 of one; then all
    def cpu(t, n):
        return (1.0 if n == 2 else 0.67) if t < 3 else n
    gov, run, set_to = _governor(cpu)
    run(1.5)
    assert gov.threads == 1 and set_to == [1]
    run(1.5)
    assert gov.threads == 1  # 0.67 per thread: still contended
    run(3.0)
    assert gov.threads == 2 and set_to == [1, 2]


def test_governor_keeps_its_threads_beside_a_light_client_and_when_idle():
    gov, run, set_to = _governor(lambda t, n: 0.85 * n)  # a client on the same machine takes 15%
    run(5.0)
    gov.idle()
    run(0.3)
    assert set_to == [] and gov.threads == 2
