"""Layer 1, the model: Mistral 7B's forward pass, its rolling KV cache, and its checkpoint and tokenizer formats.

Reading order: config -> layers (one function per equation) -> cache (the rolling buffer) -> safetensors (the file
format) -> weights (checkpoint layouts) -> mapped (16-bit weights widened block by block) -> model (the forward
pass) -> oracle (a naive reference beside it) -> tokenizer. Imports only the foundation (minispec.errors,
minispec.backend).
"""
