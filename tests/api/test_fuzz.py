"""Schema-driven fuzzing of every operation in /openapi.json: no input may produce a 5xx (503 from a
full queue aside). Bounded: MAX_EXAMPLES per operation, so it fits in CI."""

import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.api.main import create_app
from tests.api.conftest import ADMIN, make_settings

MAX_EXAMPLES = 25

app = create_app(make_settings(__import__("pathlib").Path(tempfile.mkdtemp(prefix="fuzz-")), max_model_len=512,
                               warmup=False, request_timeout=20))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def running_app(tiny):
    app.state.preloaded = tiny
    with TestClient(app):  # runs the lifespan: engine started, store open
        yield


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_causes_a_server_error(case):
    response = case.call(headers=ADMIN)
    assert response.status_code < 500 or response.status_code == 503, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}")
