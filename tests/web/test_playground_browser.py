"""The playground and admin page at `/`, driven end to end in a real headless browser: Debian's chromium,
through Playwright for Python (`executable_path`: Playwright's own browser download cannot be reached here).
The server is a real `promptserve serve` process on the embedded SmolLM2 with the shipped demo tasks.
Screenshots land in test-artifacts/ (PROMPTSERVE_SCREENSHOT_DIR) to look at. The browser and page fixtures:
tests/web/conftest.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect
from safetensors import safe_open
from safetensors.torch import save

from app.settings import DEMO_PROMPT_SETS
from tests.servers import serving
from tests.web.browser import screenshot

pytestmark = pytest.mark.real_model

TOKEN = "browser-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PROMPTSERVE_STORE_DIR": str(tmp_path_factory.mktemp("browser-store")),
           "PROMPTSERVE_ADMIN_TOKEN": TOKEN, "PROMPTSERVE_DTYPE": "float32",
           "PROMPTSERVE_SEED_DIR": str(DEMO_PROMPT_SETS)}
    with serving(env) as base:
        yield base


def pick(page: Page, task: str) -> None:
    page.select_option("#task", task)


def test_chat_streams_spam_scores_and_ner_highlights(page: Page, server):
    page.goto("/")
    expect(page.locator("#task option")).to_have_count(4)  # the base model and the three demo tasks
    expect(page.locator("#task")).to_have_value("chat")

    # chat: the answer streams in (several growing states of the output, then finished)
    page.fill("#input", "Write two sentences about the sea.")
    page.fill("#max-tokens", "48")
    page.evaluate("""() => { window.__lengths = []; new MutationObserver(() =>
        window.__lengths.push(document.getElementById('chat-output').textContent.length))
        .observe(document.getElementById('chat-output'), {childList: true, characterData: true, subtree: true}); }""")
    page.click("#run")
    expect(page.locator("#run-status")).to_contain_text("done", timeout=120_000)
    answer = page.locator("#chat-output").text_content()
    assert answer.strip(), "empty chat answer"
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"not streamed: {lengths}"
    assert page.locator("#chat-output").get_attribute("data-finish-reason") in {"stop", "length"}
    screenshot(page, "playground-chat")

    # spam: a score bar per label, widths follow the scores, the winner marked
    pick(page, "spam")
    page.fill("#input", "WINNER!! You have won a free prize, call 09061701461 now to claim")
    page.click("#run")
    rows = page.locator("#scores .score-row")
    expect(rows).to_have_count(2, timeout=60_000)
    scores = {rows.nth(i).get_attribute("data-label"): float(rows.nth(i).get_attribute("data-score")) for i in range(2)}
    assert set(scores) == {"spam", "ham"} and abs(sum(scores.values()) - 1) < 1e-3, scores
    winner = page.locator("#scores .score-row.winner").get_attribute("data-label")
    assert winner == max(scores, key=scores.get)
    widths = {label: page.locator(f'#scores .score-row[data-label="{label}"] .bar').evaluate(
        "b => b.getBoundingClientRect().width / b.parentElement.getBoundingClientRect().width") for label in scores}
    for label in scores:
        assert abs(widths[label] - scores[label]) < 0.02, (widths, scores)
    screenshot(page, "playground-spam")

    # ner: the entities the API returns are highlighted at their offsets in the text (a non-BMP character
    # first, so code-point offsets and JavaScript's UTF-16 indices would differ if the page mixed them up)
    text = "🌍 Barack Obama met Angela Merkel in Berlin and visited Microsoft in Seattle."
    api = httpx.post(f"{server}/v1/tasks/ner", json={"text": text}, timeout=60).json()["entities"]
    pick(page, "ner")
    page.fill("#input", text)
    page.click("#run")
    expect(page.locator("#entity-list li").first).to_be_visible(timeout=60_000)
    marks = page.locator("#entity-text mark.entity")
    expect(marks).to_have_count(len(api))
    assert api, "the demo NER task found no entity in an easy sentence"
    for i, entity in enumerate(sorted(api, key=lambda e: e["start"])):
        assert marks.nth(i).get_attribute("data-label") == entity["label"]
        assert marks.nth(i).evaluate("m => m.firstChild.textContent") == entity["text"]
    assert page.locator("#entity-text").evaluate("e => e.firstChild.textContent").startswith("🌍 ")
    screenshot(page, "playground-ner")


def _second_version(tmp_path: Path) -> Path:
    """The spam prompt set with another description: other bytes, so a second version."""
    source = DEMO_PROMPT_SETS / "spam.safetensors"
    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["description"] = "uploaded from the browser test"
    out = tmp_path / "spam-v2.safetensors"
    out.write_bytes(save(tensors, meta))
    return out


def test_admin_uploads_activates_and_deletes(page: Page, server, tmp_path):
    page.on("dialog", lambda d: d.accept())
    page.goto("/")
    page.click("#tab-admin")

    # a wrong token: the server's own message, as it is
    page.fill("#admin-token", "wrong")
    page.click("#admin-connect")
    expect(page.locator("#admin-message.error")).to_have_text("403: wrong admin token")

    page.fill("#admin-token", TOKEN)
    page.click("#admin-connect")
    expect(page.locator(".task-card")).to_have_count(3)

    # upload two versions of a new task, the second active
    page.fill("#upload-name", "browser")
    page.set_input_files("#upload-file", str(DEMO_PROMPT_SETS / "spam.safetensors"))
    page.click("#upload")
    expect(page.locator("#admin-message.ok")).to_contain_text("stored browser v1")
    page.set_input_files("#upload-file", str(_second_version(tmp_path)))
    page.click("#upload")
    expect(page.locator("#admin-message.ok")).to_contain_text("stored browser v2")
    card = page.locator('.task-card[data-task="browser"]')
    expect(card.locator("tr.active")).to_have_attribute("data-version", "2")

    # the same bytes again: the server says it stored nothing new
    page.click("#upload")
    expect(page.locator("#admin-message.ok")).to_contain_text("already stored as browser v2")

    # a file that is no prompt set: the server's 422 message shown as it is
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    page.set_input_files("#upload-file", str(junk))
    page.click("#upload")
    expect(page.locator("#admin-message.error")).to_contain_text("422: ")

    # activate the older version: the API serves v1 from then on, and the playground's task list says so
    card.locator('tr[data-version="1"] button.activate').click()
    expect(page.locator("#admin-message.ok")).to_have_text("browser: v1 is active")
    expect(card.locator("tr.active")).to_have_attribute("data-version", "1")
    served = httpx.post(f"{server}/v1/tasks/browser", json={"text": "hello"}, timeout=60).json()["prompt_set"]
    assert served == {"name": "browser", "version": 1}
    screenshot(page, "admin")

    # the active version cannot be deleted: the server's 409, shown; the other one can
    card.locator('tr[data-version="1"] button.delete').click()
    expect(page.locator("#admin-message.error")).to_contain_text("409: ")
    card.locator('tr[data-version="2"] button.delete').click()
    expect(page.locator("#admin-message.ok")).to_have_text("deleted browser v2")
    expect(card.locator("tbody tr")).to_have_count(1)

    # the task list of the playground follows
    page.click("#tab-playground")
    expect(page.locator('#task option[value="browser"]')).to_have_count(1)
    page.click("#tab-admin")
    card.locator("button.danger", has_text="Delete task").click()
    expect(page.locator('.task-card[data-task="browser"]')).to_have_count(0)
    expect(page.locator('#task option[value="browser"]')).to_have_count(0)
    # the token was kept in the page's memory only
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
    assert TOKEN not in page.evaluate("() => document.cookie + location.href")


@pytest.mark.parametrize("path,ready", [("/docs", ".swagger-ui .info .title"),
                                        ("/redoc", "[role=search], .api-content")])
def test_api_docs_render_with_the_network_off(page: Page, path, ready):
    page.goto(path)
    expect(page.locator(ready).first).to_be_visible(timeout=30_000)
    expect(page.locator("body")).to_contain_text("promptserve")
    if path == "/docs":  # the operations are listed, so the OpenAPI document loaded and rendered
        expect(page.locator(".opblock").first).to_be_visible()
    screenshot(page, f"docs{path.replace('/', '-')}")
