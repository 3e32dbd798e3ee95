"""The web UI's Eval view: the reports under the output folders listed from /api/evals, and the one chosen drawn
in the page from its eval_report.json (the matrix heatmap, leakage bars with counts, headline figures). Headless
Chromium reads the numbers back from the page. With KEEL_SCREENSHOTS=1 the browser test also saves a screenshot
of every tab into docs/images/web-ui-TAB.png (the pictures docs/web-ui.md shows)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from keel.cli import main
from tests.helpers import sft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, id_file, tmp_path_factory):
    """A CLI run on the tiny model that takes the identity (probed at each eval), then `keel eval` on its last
    checkpoint; returns (output folder, checkpoint, report folder)."""
    root = tmp_path_factory.mktemp("webui") / "out"
    res = sft(["--model", tiny_model_dir, "--dataset", id_file, "--output_dir", root / "cli-run", "--max_steps", "48",
               "--learning_rate", "2e-2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
               "--lora_rank", "32", "--lora_alpha", "64", "--split_dataset_ratio", "0.1", "--eval_identity", "true",
               "--eval_steps", "12", "--logging_steps", "4", "--model_name", "Keel", "--model_author", "Acme"])
    ckpt = Path(res["last_model_checkpoint"])
    with pytest.raises(SystemExit) as done:
        main(["eval", "--adapters", str(ckpt), "--questions_per_cell", "2", "--leakage_per_lang", "6"])
    assert done.value.code in (0, None)
    return root, ckpt, ckpt.parent / f"eval-{ckpt.name}"


def test_eval_api_lists_reports_and_refuses_bad_paths(evaluated, tmp_path):
    from keel.webui.app import create_app

    root, ckpt, folder = evaluated
    client = TestClient(create_app([root]))
    reports = client.get("/api/evals").json()["reports"]
    assert [r["path"] for r in reports] == [str(folder.resolve())] and reports[0]["adapters"] == [str(ckpt)]
    got = client.get("/api/evals/report", params={"path": str(folder)}).json()
    report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))
    assert got["details"] == report["details"] and got["results"] == report["results"] and "samples" not in got
    for path, status, words in ((tmp_path, 403, "outside the output folders"), (root, 404, "no eval_report.json"),
                                (broken_report(root), 400, "eval_report.json: not a readable evaluation report")):
        r = client.get("/api/evals/report", params={"path": str(path)})
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
        assert "\n" not in r.json()["error"]["message"]
    assert [r["path"] for r in client.get("/api/evals").json()["reports"]] == [str(folder.resolve())]  # broken: left out


def broken_report(root: Path) -> Path:
    folder = root / "broken-eval"
    folder.mkdir(exist_ok=True)
    (folder / "eval_report.json").write_text('{"results": {', encoding="utf-8")
    return folder


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_eval_view_draws_the_reports_numbers(evaluated, tiny_model_dir):
    from playwright.sync_api import sync_playwright

    from keel.webui.app import create_app
    from tests.helpers import LiveServer

    root, ckpt, folder = evaluated
    report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))
    app = create_app([root])
    srv = LiveServer(app)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(srv.url + "/")
            page.click("nav button[data-tab=evals]")
            page.wait_for_selector("#eval_matrix td[data-rate]", timeout=60_000)
            squares = page.eval_on_selector_all("#eval_matrix td[data-rate]", "tds => tds.map(td => [td.dataset.row, "
                                                "td.dataset.cell, td.dataset.lang, td.textContent, td.className])")
            want = [(row, name, lang, f"{c['rate']:g} ({c['hits']}/{c['asked']})", row_worst(report, row, name, lang))
                    for row in ("base", "tuned") for name, per in report["details"][row]["cells"].items()
                    for lang, c in per.items()]
            assert sorted((r, n, lang, text, cls) for r, n, lang, text, cls in squares) == sorted(want)
            bars = page.eval_on_selector_all("#eval_leakage .leak-row", "rows => rows.map(r => [r.dataset.row, "
                                             "r.dataset.set, Number(r.dataset.leaks), Number(r.dataset.asked)])")
            assert sorted(tuple(b) for b in bars) == sorted(
                (row, key, *report["details"][row]["counts"][key]) for row in ("base", "tuned")
                for key in ("ordinary/en", "ordinary/zh", "contrast/en", "contrast/zh"))
            cells = page.eval_on_selector_all("#eval_headline tr[data-metric=identity_robustness] td",
                                              "tds => tds.map(td => td.textContent)")
            assert cells[1:3] == [f"{report['results'][r]['identity_robustness']:g}" for r in ("base", "tuned")]
            if os.environ.get("KEEL_SCREENSHOTS") == "1":
                screenshot_tabs(page, ckpt, tiny_model_dir)
            browser.close()
    finally:
        srv.stop()


def row_worst(report: dict, row: str, name: str, lang: str) -> str:
    return "worst" if report["details"][row]["worst_cell"] == f"{name} / {lang}" else ""


def screenshot_tabs(page, ckpt: Path, model: Path):
    """Every tab showing what it is for, saved as docs/images/web-ui-TAB.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "web-ui-eval.png", full_page=True)
    page.click("nav button[data-tab=identity]")
    page.fill("#model", str(model))
    page.click("#preview")
    page.wait_for_selector("#rows tr.row", timeout=60_000)
    page.screenshot(path=SHOTS / "web-ui-identity.png")
    page.click("nav button[data-tab=train]")
    page.click(f"#runs tr.run[data-path='{ckpt.parent}']")
    page.wait_for_function("(state.points.identity_hit || []).length >= 2", timeout=60_000)
    page.screenshot(path=SHOTS / "web-ui-train.png", full_page=True)
    page.click("nav button[data-tab=compare]")
    page.select_option("#ckpt", str(ckpt))
    page.click("#ask")
    page.wait_for_function("document.querySelector('#tuned_answer').dataset.done === '1'", timeout=120_000)
    page.screenshot(path=SHOTS / "web-ui-compare.png")
    page.click("nav button[data-tab=chat]")
    chat = page.frame_locator("#chat_frame")
    chat.locator("#input").fill("Who are you?")
    chat.locator("#send").click()
    chat.locator(".msg.assistant .rate .down").wait_for(timeout=60_000)
    page.screenshot(path=SHOTS / "web-ui-chat.png")
    page.click("nav button[data-tab=export]")
    page.screenshot(path=SHOTS / "web-ui-export.png")
