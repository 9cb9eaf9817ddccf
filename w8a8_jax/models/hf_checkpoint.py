"""Llama weights in a Hugging Face safetensors directory: loading (float or fp8) and saving (float).

The directory is the layout `w8a8-jax quantize` reads and writes, and transformers and
llm-compressor load: `config.json` (a `LlamaForCausalLM` config, with `quantization_config` when
fp8), `model.safetensors` (or an index of shards) with tensors named `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight` and, untied,
`lm_head.weight`. An fp8 directory holds its linear layers as `checkpoint` reads them.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import checkpoint, module_tree
from w8a8_jax.checkpoint import safetensors_io
from w8a8_jax.models.llama import Llama, LlamaConfig, linear_names, norm_names

EMBEDDING = "model.embed_tokens.weight"


def _module(model: nnx.Module, path: str):
    for key in path.split("/"):
        model = module_tree.child(model, int(key) if key.isdigit() else key)
    return model


def _fill(model: Llama, tensor: Callable[[str], np.ndarray], linear: Mapping[str, str]) -> Llama:
    """Sets the embedding, the norms and the float linear layers `linear` (path -> prefix) of `model`."""
    dtype = model.embed_tokens.param_dtype

    def value(name: str, shape: tuple[int, ...]) -> jnp.ndarray:
        array = np.asarray(tensor(name))
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, the model expects {shape}")
        return jnp.asarray(array, dtype)

    config = model.config
    model.embed_tokens.embedding.set_value(value(EMBEDDING, (config.vocab_size, config.hidden_size)))
    for path, prefix in norm_names(config).items():
        _module(model, path).weight.set_value(value(f"{prefix}.weight", (config.hidden_size,)))
    for path, prefix in linear.items():
        layer = _module(model, path)
        layer.kernel.set_value(value(f"{prefix}.weight", (layer.out_features, layer.in_features)).T)
    return model


def _empty(config: LlamaConfig, dtype) -> Llama:
    """A `Llama` of the config's shapes whose values are all still to be set."""
    return nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))


def llama_from_tensors(config: LlamaConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32) -> Llama:
    """A float `Llama` from float tensors under their Hugging Face names (`(N, K)` linear weights)."""
    return _fill(_empty(config, dtype), tensors.__getitem__, linear_names(config))


def load_llama(directory: str | Path, *, dtype=jnp.float32) -> Llama:
    """A `Llama` from a Hugging Face directory, float or fp8.

    Embeddings and norms are loaded in `dtype`. The linear layers of an fp8 checkpoint (one with a
    `quantization_config`, from `w8a8-jax quantize` or llm-compressor) become `Fp8Dense` holding the
    checkpoint's codes and scales (`checkpoint.load_nnx`), those it lists as ignored stay float;
    every tensor the model has no place for is an error.
    """
    directory = Path(directory)
    source = checkpoint.SafetensorsCheckpoint(directory)
    config = LlamaConfig.from_hf(source.config)
    if config.tie_word_embeddings and "lm_head.weight" in source.names:
        raise ValueError(
            f"{directory}: config ties the LM head to the embedding, but the checkpoint holds lm_head.weight"
        )
    model = _empty(config, dtype)
    names = linear_names(config)
    fp8 = set(checkpoint.fp8_layer_prefixes(source)) if "quantization_config" in source.config else set()
    float_linear = {path: prefix for path, prefix in names.items() if prefix not in fp8}
    read = {EMBEDDING, *(f"{prefix}.weight" for prefix in [*norm_names(config).values(), *float_linear.values()])}
    unused = sorted(name for name in source.names if name not in read and name.rpartition(".")[0] not in fp8)
    if unused:
        raise ValueError(f"{directory}: {len(unused)} tensor(s) have no place in the model: {unused[:5]}")
    _fill(model, source.tensor, float_linear)
    if fp8:
        checkpoint.load_nnx(model, source, {path: prefix for path, prefix in names.items() if prefix in fp8})
    return model


def save_llama(
    directory: str | Path,
    config: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    extra_files: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes float tensors under their Hugging Face names and `config.json` into `directory`,
    atomically (a failed write leaves nothing behind); `extra_files` are files copied in, by name
    (e.g. `tokenizer.json`). Returns the directory."""
    dtypes = {str(np.asarray(array).dtype) for array in tensors.values()}
    torch_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    return safetensors_io.write_checkpoint(
        directory, tensors, config=config.to_hf(torch_dtype), extra_files=extra_files, overwrite=overwrite
    )
