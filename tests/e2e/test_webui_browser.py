"""The web UI in headless Chromium: fill the identity form, start a run on the tiny model, watch its curves
get points (loss, then the identity/leakage/drift probes), stop it and find it in the run list; a failing
run shows its one-line error; bad input shows a message; the compare view streams base and tuned answers."""

import json
import shutil

import pytest

from tests.helpers import LiveServer, sft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_identity_train_curves_stop_fail_compare(tiny_model_dir, id_file, tmp_path):
    from playwright.sync_api import sync_playwright

    from keel.webui.app import create_app

    roots = [tmp_path / "out", tmp_path / "cli"]
    # A finished run from the CLI, for the compare view (and to be listed beside the UI's runs).
    done = sft(["--model", tiny_model_dir, "--dataset", id_file, "--output_dir", roots[1] / "cli-run", "--max_steps", "4",
                "--learning_rate", "5e-2", "--gradient_accumulation_steps", "2", "--split_dataset_ratio", "0"])
    broken = roots[0] / "broken.jsonl"  # general data comes from inside the output folders
    roots[0].mkdir(parents=True)
    broken.write_text('{"messages": [\n')
    app = create_app(roots)
    srv = LiveServer(app)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.fill("#model", str(tiny_model_dir))
            page.fill("#name_en", "   ")
            page.click("#preview")
            page.wait_for_selector("#identity_msg.error")
            assert "name" in page.text_content("#identity_msg")
            page.fill("#name_en", "Keel")
            page.fill("#author_en", "Acme Lab")
            page.click("#preview")
            page.wait_for_selector("#rows tr.row", timeout=60_000)
            assert "no problems found" in page.text_content("#findings")
            n_rows = page.locator("#rows tr.row").count()
            page.locator("#rows tr.row textarea").first.fill("I am Keel, made by Acme Lab. Edited.")

            page.click("nav button[data-tab=train]")
            page.fill("#folder", "web")
            page.fill("#general", "")
            page.fill("#lr", "fast")
            page.click("#start")
            page.wait_for_selector("#train_msg.error")
            assert "learning_rate" in page.text_content("#train_msg")
            page.fill("#lr", "2e-2")
            page.fill("#epochs", "100")
            page.fill("#eval_steps", "4")
            page.click("#start")
            page.wait_for_function("Number(document.querySelector('#points').dataset.n || 0) >= 3", timeout=180_000)
            page.wait_for_function("(state.points.identity_hit || []).length >= 1 && (state.points.drift_kl || []).length >= 1",
                                   timeout=240_000)
            page.click("#stop")
            page.wait_for_selector("#runs tr.run.chosen td.status-stopped", timeout=60_000)
            run_dir = page.get_attribute("#runs tr.run.chosen", "data-path")
            data = json.loads(open(next(p for p in (roots[0] / "web").glob("self_cognition-*.json"))).read())
            assert len(data) == n_rows and data[0]["messages"][-1]["content"] == "I am Keel, made by Acme Lab. Edited."
            assert run_dir.startswith(str(roots[0].resolve() / "web"))

            page.fill("#folder", "bad")
            page.fill("#general", str(broken))
            page.click("#start")
            page.wait_for_function("document.querySelector('#train_msg').textContent.startsWith('keel: error:')",
                                   timeout=120_000)
            assert "broken.jsonl" in page.text_content("#train_msg")
            assert page.locator("#runs td.status-failed").count() == 1

            page.click("nav button[data-tab=compare]")
            page.select_option("#ckpt", done["last_model_checkpoint"])
            page.fill("#question", "Who are you?")
            page.click("#ask")
            page.wait_for_function("document.querySelector('#tuned_answer').dataset.done === '1'", timeout=120_000)
            base, tuned = page.text_content("#base_answer"), page.text_content("#tuned_answer")
            assert base.strip() and tuned.strip() and base != tuned
            assert page.text_content("#compare_msg") == ""
            browser.close()
    finally:
        for job in app.state.ui.jobs.list():
            if job["status"] == "running":
                app.state.ui.jobs.stop(job["id"])
        srv.stop()
