import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings

ADMIN = {"Authorization": "Bearer s3cret"}


def make_settings(tmp_path, **kw) -> Settings:
    return Settings(**{"store_dir": tmp_path / "store", "seed_dir": "", "admin_token": "s3cret", "max_num_seqs": 4,
                       "max_model_len": 256, "warmup": True, **kw})


@pytest.fixture
def client(tiny, tmp_path):
    with TestClient(create_app(make_settings(tmp_path), loaded=tiny)) as c:
        yield c


@pytest.fixture
def live_server(tiny, tmp_path):
    """The app on a real uvicorn server in a background thread (real sockets: disconnects, streaming)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(make_settings(tmp_path, max_model_len=1024, warmup=False), loaded=tiny)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)
