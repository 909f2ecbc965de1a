"""The playground and admin page served at `/`: static, dependency-free HTML, CSS and JavaScript (no build
step, nothing fetched from another host). It talks to the server only through the public HTTP API."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
