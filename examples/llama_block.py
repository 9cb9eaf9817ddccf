"""A Llama-style decoder block in nnx, quantized to fp8 by the converter and compared to the float block.

RMSNorm -> attention (fused QKV, rotary embeddings, grouped-query heads, causal) -> residual ->
RMSNorm -> SwiGLU MLP (fused gate/up) -> residual. Run: `python examples/llama_block.py`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import convert


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    ffn: int = 512
    rope_theta: float = 10000.0


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates `x (B, T, H, D)` by position (the half-split RoPE of Llama)."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * frequencies  # (T, D/2)
    sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        self.config = config
        q, kv = config.heads * config.head_dim, config.kv_heads * config.head_dim
        self.qkv_proj = nnx.Linear(config.hidden, q + 2 * kv, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(q, config.hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape
        q_width, kv_width = c.heads * c.head_dim, c.kv_heads * c.head_dim
        qkv = self.qkv_proj(x)
        q = qkv[..., :q_width].reshape(batch, length, c.heads, c.head_dim)
        k = qkv[..., q_width : q_width + kv_width].reshape(batch, length, c.kv_heads, c.head_dim)
        v = qkv[..., q_width + kv_width :].reshape(batch, length, c.kv_heads, c.head_dim)
        positions = jnp.arange(length)
        q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
        k = jnp.repeat(k, c.heads // c.kv_heads, axis=2)
        v = jnp.repeat(v, c.heads // c.kv_heads, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(c.head_dim)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, q_width)
        return self.o_proj(out)


class SwiGLU(nnx.Module):
    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        self.ffn = config.ffn
        self.gate_up_proj = nnx.Linear(config.hidden, 2 * config.ffn, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(config.ffn, config.hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(jax.nn.silu(gate_up[..., : self.ffn]) * gate_up[..., self.ffn :])


class DecoderBlock(nnx.Module):
    """One Llama decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`."""

    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        self.input_norm = nnx.RMSNorm(config.hidden, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.post_attention_norm = nnx.RMSNorm(config.hidden, rngs=rngs)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x + self.attn(self.input_norm(x))
        return h + self.mlp(self.post_attention_norm(h))


def rules_for(config: BlockConfig) -> list[convert.QuantizationRule]:
    """Fused QKV and gate/up keep per-shard scales (vLLM's layout); o_proj is calibrated static."""
    q, kv = config.heads * config.head_dim, config.kv_heads * config.head_dim
    return [
        convert.QuantizationRule(
            r".*qkv_proj",
            weight_granularity="per_tensor",
            activation_scheme="dynamic_per_tensor",
            shard_widths=(q, kv, kv),
        ),
        convert.QuantizationRule(r".*gate_up_proj", shard_widths=(config.ffn, config.ffn)),
        convert.QuantizationRule(r".*o_proj", weight_granularity="per_tensor", activation_scheme="static"),
        convert.QuantizationRule(r".*down_proj", activation_scheme="dynamic_per_token"),
    ]


def quantize_block(config: BlockConfig = BlockConfig(), *, seed: int = 0, batch: int = 2, length: int = 16):
    """Builds a float block and an fp8 copy; returns `(float_block, fp8_block, report, inputs)`."""
    float_block = DecoderBlock(config, rngs=nnx.Rngs(seed))
    fp8_block = nnx.clone(float_block)
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    calibration = [jax.random.normal(k, (batch, length, config.hidden), jnp.bfloat16) for k in keys[:3]]
    report = convert.quantize_nnx(fp8_block, rules_for(config), calibration_data=calibration)
    inputs = jax.random.normal(keys[3], (batch, length, config.hidden), jnp.bfloat16)
    return float_block, fp8_block, report, inputs


def main() -> None:
    float_block, fp8_block, report, inputs = quantize_block()
    print(report)
    run = nnx.jit(lambda block, x: block(x))
    reference = run(float_block, inputs).astype(jnp.float32)
    out = run(fp8_block, inputs).astype(jnp.float32)
    # Compare the blocks' updates (output minus the residual input), which the layers produce.
    delta_ref = reference - inputs.astype(jnp.float32)
    delta = out - inputs.astype(jnp.float32)
    sqnr = 10 * np.log10(float(jnp.sum(delta_ref**2) / jnp.sum((delta - delta_ref) ** 2)))
    print(
        f"block output: SQNR {sqnr:.1f} dB of the residual update, "
        f"max |fp8 - float| {float(jnp.max(jnp.abs(out - reference))):.4f}"
    )


if __name__ == "__main__":
    main()
