"""Keel: give an open instruct LLM its own identity with LoRA, while it keeps what it knew.

The packages are layers; a module imports only from its own layer or the ones before it (tests/test_architecture.py):

    core     errors, atomic files, flags, text rules, the hub
    model    loading (device and dtype), LoRA, chat templates, generation, the llama.cpp backend
    data     dataset files, mixing, the identity builder, checks: a tokenizer at most, never a model
    evals    probe sets, scoring rules, the robustness matrix, leakage, drift, multiple choice, `keel eval`
    synth    rows the base model writes: ballast, guard rows, identity pairs, self answers
    train    batching, losses, the run folder and checkpoints, `keel sft`, `keel rlhf`
    recipes  whole jobs built from the commands' functions: `keel recipe identity`
    export   merged weights, GGUF, the Modelfile, the identity gate over each artifact
    serve    `keel infer`, `keel deploy` (OpenAI API, request queue, web chat), the feedback store
    webui    `keel web-ui`

Evaluation sits below synth and train: synthesized rows are filtered by the eval's scoring rules, and training
probes the identity at each eval step. keel/cli.py (the `keel` command) stands above every layer.
"""

__version__ = "0.1.0"

LAYERS = ("core", "model", "data", "evals", "synth", "train", "recipes", "export", "serve", "webui")
