"""Llama-family models from a GGUF file (llama.cpp's format): config, float tensors, tokenizer.

Needs two packages beyond the library's own (`pip install 'w8a8_jax[llama]'`): `gguf` reads the
file and dequantizes its tensors (Q4_1, Q8_0, ...) to float32 in NumPy, and `tokenizers` runs the
byte-level BPE tokenizer built from the file's vocabulary and merges.

The tensors come out under Hugging Face names (`hf_checkpoint`), so a GGUF model and a safetensors
directory take one path into `Llama`. llama.cpp stores the rows of the query and key projections
permuted for its interleaved RoPE; `read_gguf` restores the half-split order that `llama.rope` uses.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from w8a8_jax.models.llama import LlamaConfig

# llama.cpp tensor names -> Hugging Face prefixes ("blk.{i}." -> "model.layers.{i}.").
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF token types (llama.cpp's llama_token_type): control tokens are special, never split or merged.
_CONTROL_TOKEN = 3


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds: the config, float32 tensors `(N, K)` under Hugging Face names, the
    tokenizer (a `tokenizers.Tokenizer`), the chat template (Jinja source, or None) and the file's
    other metadata by key."""

    config: LlamaConfig
    tensors: dict[str, np.ndarray]
    tokenizer: Any
    chat_template: str | None
    metadata: dict[str, Any]


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"reading GGUF models needs the {name!r} package: pip install 'w8a8_jax[llama]'") from None


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a query or key projection `(heads * D, K)`: within each
    head it stores rows `(0, D/2, 1, D/2 + 1, ...)` (interleaved pairs); this returns `(0, 1, ...)`."""
    rows, features = weight.shape
    if rows % (2 * heads):
        raise ValueError(f"a projection of {rows} rows cannot hold {heads} heads of even size")
    return weight.reshape(heads, rows // heads // 2, 2, features).swapaxes(1, 2).reshape(rows, features)


def _hf_name(name: str) -> str:
    stem, _, leaf = name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{leaf}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{leaf}"
    raise ValueError(f"GGUF tensor {name!r} has no place in a Llama model")


def _config(metadata: dict[str, Any], tensor_names: set[str]) -> LlamaConfig:
    architecture = metadata["general.architecture"]
    if architecture != "llama":
        raise NotImplementedError(f"GGUF architecture {architecture!r}: only 'llama' is implemented")

    def field(key, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"the GGUF file has no llama.{key}")
        return value

    if "llama.rope.scaling.type" in metadata and metadata["llama.rope.scaling.type"] != "none":
        raise NotImplementedError("RoPE scaling is not implemented; this GGUF file has one")
    heads = field("attention.head_count")
    hidden = field("embedding_length")
    return LlamaConfig(
        vocab_size=field("vocab_size", len(metadata.get("tokenizer.ggml.tokens", ()))),
        hidden_size=hidden,
        intermediate_size=field("feed_forward_length"),
        num_hidden_layers=field("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field("attention.head_count_kv", heads),
        head_dim=field("rope.dimension_count", hidden // heads),
        rope_theta=float(field("rope.freq_base", 10000.0)),
        rms_norm_eps=float(np.float32(field("attention.layer_norm_rms_epsilon"))),
        max_position_embeddings=field("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def build_tokenizer(metadata: dict[str, Any]):
    """The byte-level BPE tokenizer of a GGUF file's `tokenizer.ggml.*` metadata (model "gpt2").

    Control tokens (`<|im_start|>`, ...) are special: matched whole in the text, never merged. The
    pre-tokenizer is GPT-2's byte-level split; `tokenizer.ggml.pre` "smollm" (and "llama3"-style
    ones that isolate digits) also split every digit on its own, as llama.cpp does for them.
    """
    tokenizers = _import("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model {metadata.get('tokenizer.ggml.model')!r}: only gpt2 BPE")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = tokenizers.Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", ())
    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL_TOKEN
    ]
    tokenizer.add_special_tokens(special)
    return tokenizer


def read_gguf(path: str | Path) -> GGUFModel:
    """Reads a Llama GGUF file: every tensor dequantized to float32, the Q/K rows un-permuted."""
    gguf = _import("gguf")
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    config = _config(metadata, {tensor.name for tensor in reader.tensors})
    tensors = {}
    for tensor in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            array = unpermute_rope_rows(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rope_rows(array, config.num_key_value_heads)
        tensors[name] = array.reshape(tuple(reversed([int(n) for n in tensor.shape])))
    return GGUFModel(
        config=config,
        tensors=tensors,
        tokenizer=build_tokenizer(metadata),
        chat_template=metadata.get("tokenizer.chat_template"),
        metadata={k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.")},
    )
