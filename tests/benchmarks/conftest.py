from tests.api.conftest import live_server  # noqa: F401  (the same real-socket server fixture)
