"""`keel export`: merged weights (run.py), GGUF files and the Ollama Modelfile (gguf.py), and the identity gate
that runs every artifact the way it is served (verify.py). Imports core, model and evals."""
