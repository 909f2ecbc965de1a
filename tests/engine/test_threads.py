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


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _governor(samples, usable=2):
    clock, set_to = _Clock(), []
    it = iter(samples)
    gov = threads.ThreadGovernor(usable, interval=0.2, smoothing=0.5, calm_seconds=1.0, sample=lambda: next(it),
                                 set_threads=set_to.append, clock=clock)
    return gov, clock, set_to


def test_governor_gives_up_threads_to_busy_neighbours_and_takes_them_back_once_calm():
    gov, clock, set_to = _governor([2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    for _ in range(3):
        gov.between_steps()
        clock.now += 0.2
    assert gov.threads == 1 and set_to == [1]  # two busy processes on two cores: one thread
    for _ in range(9):
        gov.between_steps()
        clock.now += 0.2
    assert gov.threads == 2 and set_to == [1, 2]  # calm for a second: both again


def test_governor_ignores_a_light_or_brief_neighbour_and_samples_at_its_interval():
    gov, clock, set_to = _governor([0, 1, 0, 0, 0, 0])
    for _ in range(6):
        gov.between_steps()
        gov.between_steps()  # a second call within the interval samples nothing
        clock.now += 0.2
    assert set_to == [] and gov.threads == 2


def test_runnable_elsewhere_reads_proc():
    assert threads.runnable_elsewhere() is not None  # Linux: /proc tells
