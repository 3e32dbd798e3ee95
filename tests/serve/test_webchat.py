"""The web chat page in headless Chromium: send a message, 👎 it, write a correction, find it in SQLite."""

import shutil
import sqlite3

import pytest

from keel.model.load import ModelArgs, load_model
from keel.serve.feedback import FeedbackStore
from tests.helpers import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_page_send_rate_correct(tiny_model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    from keel.serve.server import create_app

    model, tok, info = load_model(ModelArgs(model=str(tiny_model_dir)))
    db = tmp_path / "feedback.sqlite"
    srv = LiveServer(create_app(model, tok, info, store=FeedbackStore(db), model_id="tiny"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.fill("#input", "Who are you?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant .rate .down", timeout=60_000)
            page.click(".msg.assistant .rate .down")
            page.fill(".msg.assistant .fix textarea", "I am Keel, made by Acme Lab.")
            page.click(".msg.assistant .fix .save")
            page.wait_for_function("document.querySelector('.msg.assistant .rate small').textContent === 'recorded'"
                                   " && document.querySelectorAll('.msg.assistant .rate small').length === 1", timeout=30_000)
            page.wait_for_timeout(300)
            browser.close()
    finally:
        srv.stop()
    rows = sqlite3.connect(db).execute(
        "SELECT f.rating, f.correction, c.messages FROM feedback f JOIN completions c ON c.id = f.completion_id").fetchall()
    assert ("down", "I am Keel, made by Acme Lab.") in [(r[0], r[1]) for r in rows]
    assert all("Who are you?" in r[2] for r in rows)
