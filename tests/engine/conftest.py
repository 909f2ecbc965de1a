import pytest

from app.engine import kernels


@pytest.fixture(scope="session")
def native_kernels(tmp_path_factory) -> kernels.NativeKernels:
    """The native kernels built into a fresh directory; the test is skipped where no compiler is (the
    engine then uses torch's own ops, which every other test exercises)."""
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler: the engine uses torch's own ops")
    native = kernels.load(tmp_path_factory.mktemp("kernels"))
    assert native.decode_attention is not None, "a compiler is here, so the kernels must build"
    return native
