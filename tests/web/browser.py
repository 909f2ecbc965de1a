"""Driving the page in Debian's chromium through Playwright for Python (`executable_path`: Playwright's own
browser download cannot be reached here); the fixtures are in conftest.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("PROMPTSERVE_SCREENSHOT_DIR", ROOT / "test-artifacts"))
# nothing but the server under test may be reached: every other host fails to resolve
ISOLATED = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def chromium_path() -> str:
    found = os.environ.get("PROMPTSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: apt-get install chromium (.ci/run installs it)"
    return found


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
