"""Using a trained model: loading a run, KV-cache decoding and sampling, evaluation (perplexity, needle retrieval),
safetensors weights in and out, and the Hugging Face export (with its remote-code templates in hf/)."""
