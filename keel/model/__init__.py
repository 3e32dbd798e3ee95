"""Models: loading (the one place that picks device and dtype, the embedded GGUF cache, adapters), LoRA, chat
templates (rendering and prompt ids), generation, and the llama.cpp backend behind the same calls.
Imports keel.core only."""
