import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings

ADMIN = {"Authorization": "Bearer s3cret"}


def make_settings(tmp_path, **kw) -> Settings:
    return Settings(**{"store_dir": tmp_path / "store", "admin_token": "s3cret", "max_num_seqs": 4,
                       "max_model_len": 256, "warmup": True, **kw})


@pytest.fixture
def client(tiny, tmp_path):
    with TestClient(create_app(make_settings(tmp_path), loaded=tiny)) as c:
        yield c
