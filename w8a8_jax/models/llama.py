"""A Llama-family decoder in nnx: RMSNorm, RoPE, grouped-query attention over a KV cache, SwiGLU MLP.

Its linear layers are plain `nnx.Linear` (no bias) named as in Hugging Face checkpoints, so
`convert.quantize_nnx` turns them into `Fp8Dense` by rule and `checkpoint.load_nnx` fills them from
an fp8 checkpoint: module path `layers/3/self_attn/q_proj` is checkpoint prefix
`model.layers.3.self_attn.q_proj` (`linear_names`). Embeddings, norms and a tied LM head stay float.

The numerics follow transformers' `LlamaForCausalLM`: norms in float32 scaled in the model dtype,
RoPE on the half-split (`rotate_half`) layout, softmax in float32.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

# The architecture a Hugging Face config.json names for a Llama causal LM.
_HF_ARCHITECTURE = "LlamaForCausalLM"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape and constants of a Llama-family decoder (the fields of its config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
        """From a Hugging Face `config.json` dict of a `LlamaForCausalLM` (no RoPE scaling)."""
        if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise NotImplementedError("RoPE scaling is not implemented; this config has one")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise NotImplementedError("biased attention or MLP projections are not implemented")
        if config.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={config['hidden_act']!r}: only silu (SwiGLU) is implemented")
        values = {field.name: config[field.name] for field in dataclasses.fields(cls) if field.name in config}
        values.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        values.setdefault("num_key_value_heads", config["num_attention_heads"])
        if "rope_theta" not in config and "rope_parameters" in config:
            values["rope_theta"] = config["rope_parameters"]["rope_theta"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**values)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The Hugging Face `config.json` dict that `from_hf` reads back."""
        return {
            "architectures": [_HF_ARCHITECTURE],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": torch_dtype,
            **dataclasses.asdict(self),
        }


@flax.struct.dataclass
class KVCache:
    """The keys and values of every layer: `keys[i]`, `values[i]` are `(B, num_key_value_heads, S,
    head_dim)`; position `p` of a sequence is row `p` of each head, and `S` is the most positions it
    can hold. Heads lead so that attention contracts over the cache as it lies, transposing none of it."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class RMSNorm(nnx.Module):
    """`weight * (x / sqrt(mean(x^2) + eps))`, the mean over the last axis in float32."""

    def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x (B, T, heads, D)` at `positions (B, T)`, half-split layout:
    dimension `i < D/2` pairs with `i + D/2` and turns by `position / theta^(2i/D)`."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _write(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """`cache (B, H, S, D)` with `new (B, T, H, D)` written at rows `starts[b] .. starts[b] + T - 1`
    of every head."""
    new = new.swapaxes(1, 2).astype(cache.dtype)  # (B, H, T, D): T rows, not the cache, move
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, starts)


def _linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query self-attention: `num_attention_heads` query heads share `num_key_value_heads`
    key/value heads; new keys and values go into the cache, queries attend to every cached position
    up to their own.

    `__call__(x (B, T, hidden), positions (B, T), keys, values, starts (B,))` with one layer's cache
    `keys`, `values` `(B, num_key_value_heads, S, head_dim)` -> `(out (B, T, hidden), keys, values)`.
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.config = config
        hidden, heads, kv_heads, head_dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = _linear(hidden, heads * head_dim, dtype, rngs)
        self.k_proj = _linear(hidden, kv_heads * head_dim, dtype, rngs)
        self.v_proj = _linear(hidden, kv_heads * head_dim, dtype, rngs)
        self.o_proj = _linear(heads * head_dim, hidden, dtype, rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, keys: jax.Array, values: jax.Array, starts: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        config = self.config
        batch, length, _ = x.shape
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        groups = config.num_attention_heads // kv_heads
        q, k, v = self.project(x)
        q = rope(q.reshape(batch, length, config.num_attention_heads, head_dim), positions, config.rope_theta)
        k = rope(k.reshape(batch, length, kv_heads, head_dim), positions, config.rope_theta)
        v = v.reshape(batch, length, kv_heads, head_dim)
        # A masked position's weight is exactly 0, but 0 * NaN is NaN: a non-finite value would reach
        # the earlier queries that never see it. Its key is non-finite too (one input row), so every
        # query that does see the position still turns NaN, through its score.
        v = jnp.where(jnp.isfinite(v), v, jnp.zeros_like(v))
        keys, values = _write(keys, k, starts), _write(values, v, starts)
        # Query head h reads KV head h // groups (as transformers' `repeat_kv`). The queries move to
        # (B, kv, groups, T, D) so that (b, k) lead on both sides of each product, as in the cache.
        q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * head_dim**-0.5
        # A query sees the cached positions up to its own; rows past a sequence's end hold another
        # step's (or no) keys and are masked, so padding never reaches a real token.
        visible = jnp.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]  # (B, T, S)
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, values.astype(q.dtype))  # (B, kv, groups, T, D)
        out = out.transpose(0, 3, 1, 2, 4).reshape(batch, length, -1)
        return self.o_proj(out), keys, values

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x (B, T, hidden)` -> queries `(B, T, heads * head_dim)`, keys and values `(B, T, kv heads *
        head_dim)`: one GEMM where `fused.fuse_projections` made a `qkv_proj`, else three."""
        qkv_proj = getattr(self, "qkv_proj", None)
        if qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_width = self.config.num_attention_heads * self.config.head_dim
        kv_width = self.config.num_key_value_heads * self.config.head_dim
        return tuple(jnp.split(qkv_proj(x), [q_width, q_width + kv_width], axis=-1))


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`; gate and up are one GEMM where
    `fused.fuse_projections` made a `gate_up_proj`."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up_proj = getattr(self, "gate_up_proj", None)
        if gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = jnp.split(gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm: `h = x + attn(norm(x))`, then `h + mlp(norm(h))`."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, keys, values, starts):
        attended, keys, values = self.self_attn(self.input_layernorm(x), positions, keys, values, starts)
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h)), keys, values


class Llama(nnx.Module):
    """A Llama-family causal decoder.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    >>> model = Llama(config, rngs=nnx.Rngs(0))
    >>> tokens = jnp.array([[1, 2, 3]])
    >>> hidden, cache = model(tokens, jnp.arange(3)[None], KVCache.create(config, 1, 8), jnp.zeros(1, jnp.int32))
    >>> model.logits(hidden).shape
    (1, 3, 64)

    `__call__(tokens (B, T) int32, positions (B, T) int32, cache, starts (B,) int32)` runs the tokens
    at `positions`, writes their keys and values at cache rows `starts[b] ..`, and returns the final
    hidden states `(B, T, hidden_size)` (after the last norm) and the new cache; `logits(hidden)` is
    the LM head in float32 (tied to the embedding when the config says so).

    Args:
      config: the model's `LlamaConfig`.
      dtype: dtype of the parameters and of the computation (default float32).
      rngs: random streams for the initial weights (a loader then sets every value).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.lm_head = (
            None if config.tie_word_embeddings else _linear(config.hidden_size, config.vocab_size, dtype, rngs)
        )

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, starts: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        x = self.embed_tokens(tokens)
        keys, values = [], []
        for layer, layer_keys, layer_values in zip(self.layers, cache.keys, cache.values, strict=True):
            x, layer_keys, layer_values = layer(x, positions, layer_keys, layer_values, starts)
            keys.append(layer_keys)
            values.append(layer_values)
        return self.norm(x), KVCache(tuple(keys), tuple(values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`hidden (..., hidden_size)` -> float32 logits `(..., vocab_size)`."""
        if self.lm_head is None:
            table = self.embed_tokens.embedding[...]
            return jnp.einsum("...h,vh->...v", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


def linear_names(config: LlamaConfig) -> dict[str, str]:
    """Module path -> checkpoint prefix of every linear layer of the decoder layers (and an untied head)."""
    names = {}
    for i in range(config.num_hidden_layers):
        for block, projections in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                   ("mlp", ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            for projection in projections:
                names[f"layers/{i}/{block}/{projection}"] = f"model.layers.{i}.{block}.{projection}"
    if not config.tie_word_embeddings:
        names["lm_head"] = "lm_head"
    return names


def norm_names(config: LlamaConfig) -> dict[str, str]:
    """Module path -> checkpoint prefix of every RMSNorm."""
    names = {"norm": "model.norm"}
    for i in range(config.num_hidden_layers):
        names[f"layers/{i}/input_layernorm"] = f"model.layers.{i}.input_layernorm"
        names[f"layers/{i}/post_attention_layernorm"] = f"model.layers.{i}.post_attention_layernorm"
    return names
