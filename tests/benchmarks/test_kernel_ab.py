"""benchmarks/kernel_ab.py: two revisions' kernels side by side in one process, under their own op namespaces."""

import pytest

from app.engine import kernels
from benchmarks import kernel_ab


def test_renames_every_registration_and_nothing_else():
    source = ("TORCH_LIBRARY(promptserve, m) {}\nTORCH_LIBRARY_FRAGMENT(promptserve, m) {}\n"
              "TORCH_LIBRARY_IMPL(promptserve, CPU, m) {}\nnamespace promptserve { int promptserve_x; }\n")
    assert kernel_ab.renamed(source, "ab_base") == (
        "TORCH_LIBRARY(ab_base, m) {}\nTORCH_LIBRARY_FRAGMENT(ab_base, m) {}\n"
        "TORCH_LIBRARY_IMPL(ab_base, CPU, m) {}\nnamespace promptserve { int promptserve_x; }\n")


def test_a_revisions_sources_are_read_from_git():
    committed = kernel_ab.sources_at("HEAD")
    assert {path.name for path in kernels.SOURCES + kernels.HEADERS} <= set(committed)
    assert set(committed) <= set(kernel_ab.sources_at(None))


@pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler")
def test_compares_two_builds_whose_outputs_agree(capsys):
    assert kernel_ab.main(["--base", "HEAD", "--op", "attention", "--batches", "2", "--positions", "24",
                           "--trials", "1"]) == 0
    assert "batch 2 at 24 positions: base" in capsys.readouterr().out
