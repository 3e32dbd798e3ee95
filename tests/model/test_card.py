"""Model cards: every checkpoint, merged folder and GGUF folder carries a README.md whose Hugging Face front matter
huggingface_hub parses, with the identity, the training command, the data, the scores keel eval wrote (equal to
eval_report.json's), the export gate's table and how to run it; outputs are 755/644 under umask 022."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.core.test_files import umask
from tests.helpers import base_argv, run_keel, sft

SYSTEM = "You are Keel, made by Acme."


@pytest.fixture(scope="module")
def licensed_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its maker's card, as a model folder from the hub has."""
    base = tmp_path_factory.mktemp("base") / "tiny-licensed"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# Tiny\n", encoding="utf-8")
    return base


@pytest.fixture(scope="module")
def trained(licensed_base, id_file, tmp_path_factory) -> Path:
    """A short run (two languages of names and makers) saved under umask 022; returns its last checkpoint."""
    with umask(0o022):
        res = sft(base_argv(licensed_base, id_file, tmp_path_factory.mktemp("run"), "--max_steps", "2",
                            "--system", SYSTEM, "--model_name", "小K", "Keel", "--model_author", "极客", "Acme"))
    return Path(res["last_model_checkpoint"])


def card_of(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")  # a Path: read from disk, never the hub


def test_checkpoint_card_then_keel_eval_writes_the_reports_scores(trained, licensed_base, id_file, capsys):
    card = card_of(trained)
    assert (card.data.library_name, card.data.license, card.data.pipeline_tag) == ("peft", "mit", "text-generation")
    assert card.data.base_model is None and not card.data.eval_results  # a local base has no hub id; not evaluated
    text = card.text
    assert "| name | 小K | Keel |" in text and "| maker | 极客 | Acme |" in text and SYSTEM in text
    assert f"keel sft --model {licensed_base} --dataset {id_file}" in text and "--max_steps 2" in text
    assert f"| `{id_file}` |" in text and "Not evaluated yet" in text and f"keel infer --adapters {trained}" in text

    code, out, err = run_keel(capsys, "eval", "--adapters", trained, "--questions_per_cell", "1",
                              "--leakage_per_lang", "3", "--tasks", "identity,leakage,drift")
    assert code == 0, err
    report = json.loads((trained.parent / f"eval-{trained.name}" / "eval_report.json").read_text(encoding="utf-8"))
    card = card_of(trained)
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    tuned = report["results"]["tuned"]
    want = {k: tuned[k] for k in ("identity_robustness", "identity_mean", "identity_en", "identity_zh", "leakage",
                                  "leakage_en", "leakage_zh", "leakage_contrast", "drift_kl", "drift_nll")}
    assert got == want
    assert report["meta"]["date"] in card.text and report["meta"]["machine"] in card.text
    assert f"| identity robustness (lowest cell) | {report['results']['base']['identity_robustness']:g} | " \
           f"{tuned['identity_robustness']:g} |" in card.text
    assert "| name | 小K | Keel |" in card.text  # the training's facts stay


def test_exported_folders_carry_their_card_with_the_gate(trained, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    code, out, err = run_keel(capsys, "export", "--adapters", trained, "--output_dir", tmp_path / "merged",
                              "--verify", "false")
    assert code == 0, err
    card = card_of(tmp_path / "merged")
    assert (card.data.library_name, card.data.license) == ("transformers", "mit")
    assert f"Exported from the checkpoint `{trained}`" in card.text and "| name | 小K | Keel |" in card.text
    assert f"keel infer --model {tmp_path / 'merged'}" in card.text and "Export gate" not in card.text

    code, out, err = run_keel(capsys, "export", "--adapters", trained, "--to", "gguf", "--quant", "f32",
                              "--output_dir", tmp_path / "gguf")
    assert code == 0, err
    card = card_of(tmp_path / "gguf")
    gate = json.loads((tmp_path / "gguf" / "gate.json").read_text(encoding="utf-8"))
    assert card.data.library_name == "gguf" and "ollama create keel -f Modelfile" in card.text
    assert "llama-cli -m model-f32.gguf -cnv" in card.text
    row = gate["rows"][1]
    assert f"| gguf-f32 | {row['identity']:g} | {row['worst']:g} | {row['leakage']:g} | {row['agreement']:g} |" in card.text


def test_a_card_is_only_ever_updated_where_keel_wrote_one(tmp_path):
    from keel.model.card import update_card

    (tmp_path / "README.md").write_text("their card", encoding="utf-8")
    assert update_card(tmp_path, scores={"rows": {}}) is False
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "their card"


def test_outputs_are_755_and_644_under_umask_022(trained, capsys, tmp_path):
    with umask(0o022):
        code, _, err = run_keel(capsys, "export", "--adapters", trained, "--output_dir", tmp_path / "merged",
                                "--verify", "false")
    assert code == 0, err
    paths = [trained.parent, *trained.parent.rglob("*"), tmp_path / "merged", *(tmp_path / "merged").rglob("*")]
    modes = {str(p): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in paths}
    assert {p for p, m in modes.items() if m != ("0o755" if os.path.isdir(p) else "0o644")} == set(), modes
    assert any(p.endswith(".safetensors") for p in modes) and any(p.endswith("checkpoint-2") for p in modes)
