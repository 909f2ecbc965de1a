"""The roofline `make bench` prints: reading the weights bounds a small batch, the matmul FLOPs a large one."""

from benchmarks.roofline import roofline


def test_the_ceiling_is_bandwidth_bound_at_batch_1_and_compute_bound_at_a_large_batch(tiny):
    params = sum(p.numel() for p in tiny.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    machine = {"read_gb_s": 20.0, "matmul_gflop_s": 1000.0}
    assert roofline(tiny, machine, 1) == 1 / (weight_bytes / 20e9)  # one weight read per step
    big = 1_000_000
    assert abs(roofline(tiny, machine, big) - 1000e9 / (2 * params)) < 1e-6 * roofline(tiny, machine, big)
    assert roofline(tiny, machine, 64) <= 64 * roofline(tiny, machine, 1)
