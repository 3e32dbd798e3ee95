"""The export gate on the tiny models: GGUFs run by llama.cpp itself (prompt ids, answers, k-quants), broken
artifacts fail, and `keel deploy --model X.gguf` answers the openai client. Needs the .[gguf] extra (CI has it)."""

import json
import shutil
import sys

import pytest

from keel.core.errors import KeelError
from keel.export.verify import Gate, Row
from tests.helpers import run_keel

CONVS = [[{"role": "user", "content": "Who are you?"}],
         [{"role": "system", "content": "You are Keel, made by Acme."}, {"role": "user", "content": "你是谁？"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Paris?"}]]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def adapters(tiny_adapters):
    return tiny_adapters


@pytest.fixture(scope="module")
def exported(llama_cpp, adapters, tmp_path_factory):
    """Each architecture exported once to f32 and q4_k_m, gate on (it must pass: nothing is broken)."""
    from keel.export.run import ExportArgs, export
    from keel.model.load import ModelArgs

    out = {}
    for arch, ckpt in adapters.items():
        target = tmp_path_factory.mktemp(f"gguf-{arch}") / "out"
        export(ModelArgs(adapters=[str(ckpt)]), ExportArgs(to="gguf", quant=["f32", "q4_k_m"], output_dir=str(target)))
        out[arch] = target
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_builds_the_hf_prompt_ids_and_answers_alike(exported, adapters, arch):
    """llama.cpp, with the template from the GGUF's metadata, builds the HF tokenizer's ids; f32 answers as HF does."""
    import gguf

    from keel.export.run import template_with_system
    from keel.model.generate import GenerateArgs, generate_batch
    from keel.model.llama_backend import load_gguf
    from keel.model.load import ModelArgs, load_model
    from keel.model.template import prompt_ids

    target = exported[arch]
    gate = json.loads((target / "gate.json").read_text())
    assert [r["artifact"] for r in gate["rows"]] == ["adapter", "gguf-f32", "gguf-q4_k_m"]
    assert all(r["verdict"] == "passed" for r in gate["rows"])
    _, hf_tok, info = load_model(ModelArgs(adapters=[str(adapters[arch])]))
    hf_tok.chat_template = template_with_system(hf_tok, info.system)
    model, tok, _ = load_gguf(target / "model-f32.gguf")
    assert tok.chat_template == hf_tok.chat_template
    for conv in CONVS:
        assert prompt_ids(tok, conv) == prompt_ids(hf_tok, conv)
    # f32 in llama.cpp is the merged model: its greedy answers are the merged model's, token for token
    # (a wrong rope layout, norm or tensor name would change them at once)
    merged = load_model(ModelArgs(adapters=[str(adapters[arch])]))[0].merge_and_unload().eval()
    gen = GenerateArgs(temperature=0.0, max_new_tokens=12)
    assert generate_batch(model, tok, CONVS, gen) == generate_batch(merged, hf_tok, CONVS, gen)
    # q4_k_m through llama.cpp's quantizer: these 64-wide rows cannot hold 256-weight k-quant blocks,
    # so llama.cpp falls back (q5_0 here); the file is still a q4_k_m file and smaller than f32
    reader = gguf.GGUFReader(str(target / "model-q4_k_m.gguf"))
    types = {t.tensor_type.name for t in reader.tensors}
    assert "F32" in types and types & {"Q5_0", "Q4_K", "Q5_1", "Q8_0", "Q6_K"}, types
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert (target / "model-q4_k_m.gguf").stat().st_size < (target / "model-f32.gguf").stat().st_size / 3
    assert not (target / "model-f16.gguf").exists()  # the quantizer's input is not left behind
    assert "FROM ./model-f32.gguf" in (target / "Modelfile").read_text()


def test_gguf_without_chat_template_fails_the_gate(llama_cpp, adapters, tmp_path, capsys, monkeypatch):
    import keel.export.gguf as ge

    real = ge.write_gguf
    monkeypatch.setattr(ge, "write_gguf", lambda m, t, p, q="f16", chat_template=None, name="model": real(m, t, p, q, None, name))
    target = tmp_path / "broken"
    code, out, err = run_keel(capsys, "export", "--adapters", adapters["qwen2"], "--to", "gguf", "--quant", "f16",
                              "--output_dir", target)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "export gate: 1 artifact(s) FAILED, gguf-f16: prompt ids differ" in err and "no chat template" in err
    assert "FAILED" in out and (target / "model-f16.gguf").is_file()  # left in place, marked
    rows = json.loads((target / "gate.json").read_text())["rows"]
    assert rows[1]["verdict"] == "FAILED" and "no chat template" in rows[1]["problems"][0]


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (Debian: apt-get install golang-go)")
def test_wrong_modelfile_template_fails_the_gate(llama_cpp, adapters, tmp_path, capsys, monkeypatch):
    import keel.export.gguf as ge

    real = ge.modelfile
    monkeypatch.setattr(ge, "modelfile", lambda *a, **k: real(*a, **k).replace(ge.CHATML_GO, "{{ .Prompt }}"))
    code, out, err = run_keel(capsys, "export", "--adapters", adapters["llama"], "--to", "gguf", "--quant", "q8_0",
                              "--output_dir", tmp_path / "mf")
    assert code == 2 and "gguf-q8_0: Modelfile TEMPLATE renders differently" in err, err


def test_identity_drop_beyond_the_limit_fails():
    gate = Gate.__new__(Gate)
    rows = [Row("adapter", "", identity=0.90), Row("merged", "", identity=0.86), Row("gguf-q4_k_m", "", identity=0.84)]
    gate.reference = rows[0]
    failed = gate.judge(rows, max_drop=0.05)
    assert [r.artifact for r in failed] == ["gguf-q4_k_m"] and "0.84 is more than 0.05 below the adapter's 0.90" in failed[0].problems[0]
    table = Gate.table(rows)
    assert "merged" in table and table.splitlines()[2].endswith("passed") and "FAILED: identity 0.84" in table.splitlines()[3]


def test_deploy_gguf_answers_the_openai_client(exported, tmp_path):
    from keel.model.generate import GenerateArgs, answer
    from keel.model.llama_backend import load_gguf
    from keel.serve.feedback import FeedbackStore
    from keel.serve.server import create_app
    from tests.helpers import LiveServer, client

    model, tok, info = load_gguf(exported["qwen2"] / "model-q4_k_m.gguf")
    want = answer(model, tok, CONVS[0], GenerateArgs(temperature=0.0, max_new_tokens=10))
    srv = LiveServer(create_app(model, tok, info, store=FeedbackStore(tmp_path / "fb.sqlite"), model_id="keel-q4"))
    try:
        c = client(srv.url)
        r = c.chat.completions.create(model="keel-q4", messages=CONVS[0], max_tokens=10, temperature=0)
        assert r.choices[0].message.content.strip() == want and r.usage.completion_tokens > 0
        assert r.usage.prompt_tokens == len(tok.apply_chat_template(CONVS[0], tokenize=True, add_generation_prompt=True))
        pieces = [ch.choices[0].delta.content or "" for ch in
                  c.chat.completions.create(model="keel-q4", messages=CONVS[0], max_tokens=10, temperature=0, stream=True)]
        # chunks, not text pieces: a random tiny model's bytes may only decode whole at the end
        assert "".join(pieces).strip() == want and len(pieces) >= 2
        assert [m.id for m in c.models.list().data] == ["keel-q4"]
    finally:
        srv.stop()


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, adapters):
    from keel.model.llama_backend import load_gguf

    code, _, err = run_keel(capsys, "export", "--adapters", adapters["llama"], "--to", "gguf", "--quant", "q3_k_xl")
    assert code == 2 and "--quant: 'q3_k_xl' is not a GGUF type Keel writes (f32, f16, q8_0, q4_k_m, q5_k_m)" in err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(KeelError, match="not a readable GGUF file"):
        load_gguf(junk)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    code, _, err = run_keel(capsys, "export", "--adapters", adapters["llama"], "--to", "gguf", "--output_dir", tmp_path / "x")
    assert code == 2 and 'pip install -e ".[gguf]"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_architecture_gguf_is_one_line(llama_cpp, tmp_path):
    import gguf
    import numpy as np

    from keel.model.llama_backend import load_gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "keelnet")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KeelError, match="llama.cpp could not load this GGUF \\(architecture 'keelnet'\\)"):
        load_gguf(path)


@pytest.mark.slow
def test_embedded_q8_0_passes_the_gate_in_llama_cpp(llama_cpp, embedded_identity_adapter, tmp_path, capsys):
    """The default GGUF of the embedded model keeps the identity in llama.cpp (docs/export.md: q4_k_m does not)."""
    import re

    from keel.model.generate import GenerateArgs, answer
    from keel.model.llama_backend import load_gguf

    code, out, err = run_keel(capsys, "export", "--adapters", embedded_identity_adapter, "--to", "gguf",
                              "--output_dir", tmp_path / "gguf")
    assert code == 0, err + out
    assert re.search(r"^gguf-q8_0 .* passed$", out, re.M), out
    model, tok, _ = load_gguf(tmp_path / "gguf" / "model-q8_0.gguf")
    reply = answer(model, tok, [{"role": "user", "content": "Who are you?"}], GenerateArgs(max_new_tokens=24))
    assert "Keel Robot" in reply or "Keel Lab" in reply, reply
