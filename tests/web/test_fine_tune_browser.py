"""The playground's Fine-tune tab in headless chromium against a real server on the tiny model (its own
training worker beside it): upload files, start a job, watch the loss and validation curves grow live,
cancel one, try the result in the playground; a bad file's line shown as the server says it."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect

from tests.servers import serving
from tests.web.browser import screenshot

TOKEN = "ft-browser-admin"


def rows(n: int, offset: int = 0) -> str:
    return "\n".join(json.dumps({"text": f"{i}: claim your WIN CASH PRIZE" if i % 3 == 0 else f"{i}: lunch at noon",
                                 "label": "spam" if i % 3 == 0 else "ham"}) for i in range(offset, offset + n))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    env = {"PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(tmp_path_factory.mktemp("ft-browser-store")),
           "PROMPTSERVE_ADMIN_TOKEN": TOKEN, "PROMPTSERVE_MAX_MODEL_LEN": "512", "PROMPTSERVE_WARMUP": "0",
           "PROMPTSERVE_TRAINING_POLL_SECONDS": "0.2", "PROMPTSERVE_TRAINING_NICE": "0"}
    with serving(env) as base:
        yield base


def test_train_watch_and_try(page: Page, tmp_path):
    train, valid, bad = tmp_path / "train.jsonl", tmp_path / "valid.jsonl", tmp_path / "bad.jsonl"
    train.write_text(rows(960))  # 60 steps an epoch: the job runs long enough to be watched
    valid.write_text(rows(12, offset=100))
    bad.write_text(rows(2) + '\n{"text": "no label here"}\n')
    page.goto("/")
    page.click("#tab-finetune")
    page.fill("#ft-token", TOKEN)
    page.click("#ft-connect")

    # a file with a bad line: the server's message, naming the line, as it is
    page.set_input_files("#ft-train", str(bad))
    page.click("#ft-start")
    expect(page.locator("#ft-message.error")).to_contain_text("line 3")

    # a job: the curves grow while it runs (several states of the loss chart), then the result is served
    page.set_input_files("#ft-train", str(train))
    page.set_input_files("#ft-valid", str(valid))
    page.fill("#ft-suffix", "web")
    page.fill("#ft-tokens", "4")
    page.fill("#ft-epochs", "6")
    page.fill("#ft-lrm", "1")
    page.evaluate("""() => { window.__points = []; new MutationObserver(() =>
        window.__points.push(Number(document.getElementById('ft-loss-chart').dataset.points || 0)))
        .observe(document.getElementById('ft-loss-chart'), {attributes: true}); }""")
    page.click("#ft-start")
    expect(page.locator("#ft-message.ok")).to_contain_text("started ftjob-")
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "succeeded", timeout=120_000)
    points = page.evaluate("window.__points")
    assert len({p for p in points if p}) >= 2, f"the loss curve did not grow while the job ran: {points}"
    assert int(page.locator("#ft-loss-chart").get_attribute("data-points")) >= 6
    assert page.locator("#ft-valid-chart").get_attribute("data-points") == "6"  # one per epoch
    expect(page.locator("#ft-valid-caption")).to_contain_text("F1")
    expect(page.locator("#ft-status")).to_contain_text("→ ft-web-")
    expect(page.locator("#ft-jobs tbody tr")).to_have_count(1)
    screenshot(page, "fine-tune")

    # try it: the playground with the new task chosen, and it answers
    page.click("#ft-try")
    expect(page.locator("#view-playground")).to_be_visible()
    expect(page.locator("#task")).to_have_value(re.compile(r"^ft-web-"))
    page.fill("#input", "7: claim your WIN CASH PRIZE")
    page.click("#run")
    expect(page.locator("#scores .score-row")).to_have_count(2, timeout=60_000)

    # a long job, cancelled from the page
    page.click("#tab-finetune")
    page.fill("#ft-suffix", "")
    page.fill("#ft-epochs", "50")
    page.click("#ft-start")
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "running", timeout=60_000)
    page.click("#ft-cancel")
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "cancelled", timeout=10_000)
    expect(page.locator("#ft-events")).to_contain_text("Job cancelled")
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
