"""Talking to a trained model: loading a checkpoint (with an optional LoRA adapter), the chat format of the
output (think block, tool calls, stop strings), the continuous-batching engine, the OpenAI-compatible API,
the GGUF export and the server benchmark. Used by chat.py, serve.py and scripts/export_gguf.py."""
