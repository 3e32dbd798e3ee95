"""keel sft's memory plan: --dry_run prints it from config.json alone, every run prints its peak, and a run whose
plan exceeds the free memory stops before loading with a line naming flags that would fit."""

import json

from tests.helpers import base_argv, run_keel

QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def test_dry_run_plans_from_config_json_alone(tmp_path, capsys):
    folder = tmp_path / "qwen7b"  # config.json only: no weights, no tokenizer
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_7B))
    code, out, err = run_keel(capsys, "sft", "--model", folder, "--dataset", tmp_path / "none.json",
                              "--output_dir", tmp_path / "out", "--dry_run", "true")
    assert code == 0, err
    assert "7,615,616,512 parameters" in out and out.strip().splitlines()[-1].startswith("memory plan: peak ")
    assert not (tmp_path / "out").exists()


def test_every_run_prints_its_plan_and_a_run_that_cannot_fit_stops_before_loading(
        tiny_model_dir, id_file, tmp_path, capsys, monkeypatch):
    code, out, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "a", "--max_steps", "1"))
    assert code == 0, err
    assert any(line.startswith("memory plan: peak ") for line in out.splitlines())
    monkeypatch.setattr("keel.train.plan.free_memory_gib", lambda device: 1e-4)
    code, out, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "b", "--max_steps", "1"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "GiB are free" in err and "--ignore_memory_plan true" in err
    assert not list((tmp_path / "b").glob("v*"))  # nothing written
    code, _, err = run_keel(capsys, "sft", *base_argv(tiny_model_dir, id_file, tmp_path / "c", "--max_steps", "1",
                                                      "--ignore_memory_plan", "true"))
    assert code == 0, err
