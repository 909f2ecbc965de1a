"""A headless chromium for the module, and a page on the module's `server` with the network off."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from playwright.sync_api import sync_playwright

from tests.web.browser import ISOLATED, chromium_path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium_path(), headless=True, args=ISOLATED)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def only_the_server(route):  # the network is off for the page: anything not the server is refused
        if urlparse(route.request.url).hostname == "127.0.0.1":
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    context.route("**/*", only_the_server)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    yield page
    context.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    # a refused admin call logs its failed fetch as a console error, and the browser logs what the pages'
    # Content-Security-Policy refused (ReDoc's logo on cdn.redoc.ly): every other console error fails the test
    assert not [e for e in console_errors
                if "Failed to load resource" not in e and "Content Security Policy" not in e], console_errors
