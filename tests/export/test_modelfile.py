"""The Ollama Modelfile: its TEMPLATE, rendered by Go's own text/template as Ollama does, gives the HF template's text."""

import shutil

import pytest

from keel.core.errors import KeelError
from keel.export.gguf import modelfile
from keel.export.verify import modelfile_mismatch, modelfile_parts, render_go
from tests.conftest import CHATML_TEMPLATE, TINY_SYSTEM

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (Debian: apt-get install golang-go)")

# Qwen2.5-Instruct's chat template (as published with the model), a ChatML one with a tools branch.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"<|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TWO_TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "你是谁？"}]


def go_render_modelfile(text: str, conversations: list[list[dict]]) -> list[str]:
    """Each conversation as Ollama renders it: .System is its system message, else the Modelfile's SYSTEM."""
    template, system = modelfile_parts(text)
    return render_go(template, [(c[0]["content"] if c[0]["role"] == "system" else system, c) for c in conversations])


@needs_go
@pytest.mark.parametrize("template,default", [(CHATML_TEMPLATE, TINY_SYSTEM),  # SmolLM2's shape
                                              (QWEN25_TEMPLATE, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")])
@pytest.mark.parametrize("trained_system", [None, "You are Keel, made by Acme."])
def test_go_renders_the_modelfile_like_the_hf_template(tiny_tokenizer, template, default, trained_system):
    if trained_system:  # what keel export does: the training prompt becomes the template's default
        template = template.replace(default, trained_system)
    text = modelfile("model-q4_k_m.gguf", tiny_tokenizer, template)
    assert f'SYSTEM """{trained_system or default}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    convs = [TWO_TURNS, [{"role": "system", "content": "You are a pirate."}, *TWO_TURNS]]
    got = go_render_modelfile(text, convs)
    for conv, rendered in zip(convs, got):
        want = tiny_tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert rendered == want


@needs_go
def test_a_wrong_template_is_caught(tiny_tokenizer, tmp_path):
    good = modelfile("m.gguf", tiny_tokenizer, CHATML_TEMPLATE)
    path = tmp_path / "Modelfile"
    path.write_text(good)
    assert modelfile_mismatch(path, tiny_tokenizer) is None
    # Ollama's own default, and a ChatML template that forgets Ollama also passes system messages in .Messages
    for wrong in ("{{ .Prompt }}", "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                  "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"):
        template, _ = modelfile_parts(good)
        path.write_text(good.replace(template, wrong))
        problem = modelfile_mismatch(path, tiny_tokenizer)
        assert problem and "renders differently" in problem


def test_unsupported_template_family_fails_clearly(tiny_tokenizer):
    with pytest.raises(KeelError, match=r"not of a family.*chatml \(SmolLM2, Qwen2.5\)"):
        modelfile("m.gguf", tiny_tokenizer, LLAMA3_TEMPLATE)
