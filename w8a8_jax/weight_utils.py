"""Weight utilities for fp8 checkpoints: fused shards (QKV, gate/up), e4m3fnuz, dequantization."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, quantization, validation


def per_tensor_dequantize(tensor: jax.Array, inv_scale, dtype=jnp.float32) -> jax.Array:
    """`tensor.astype(dtype) * inv_scale`: fp8 codes back to real values.

    vLLM dequantizes in float16; float32 is the default here because a float16 product overflows
    once `448 * scale > 65504` and rounds twice otherwise. Pass `dtype=jnp.float16` for vLLM's.
    """
    return tensor.astype(dtype) * jnp.asarray(inv_scale, dtype)


def all_close_1d(x) -> bool:
    """Whether every entry of the 1-D `x` is close to `x[0]` (torch.allclose's rtol=1e-5, atol=1e-8)."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    return bool(np.allclose(x, x[0], rtol=1e-5, atol=1e-8))


def _check_shards(weight_scale: jax.Array, logical_widths: Sequence[int], rows: int | None = None) -> None:
    if not logical_widths or not all(isinstance(w, int | np.integer) and w >= 1 for w in logical_widths):
        raise ValueError(f"logical_widths must be positive ints, one per shard, got {list(logical_widths)}")
    if weight_scale.size < len(logical_widths):
        raise ValueError(
            f"weight_scale must hold one scale per shard ({len(logical_widths)} for logical_widths="
            f"{list(logical_widths)}), got shape {tuple(weight_scale.shape)}"
        )
    if rows is not None and sum(logical_widths) != rows:
        raise ValueError(f"logical_widths must sum to weight's {rows} rows, got {list(logical_widths)}")


def requantize_with_max_scale(
    weight: jax.Array, weight_scale: jax.Array, logical_widths: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """Re-expresses a fused weight's per-shard scales as one per-tensor scale (their max).

    Args:
      weight: `(N, K)` fp8, the shards stacked on N (e.g. Q, K, V) with `logical_widths` rows each.
      weight_scale: `(S,)` or `(S, 1)` float32, one scale per shard. A last entry still at the fp8
        dtype's most negative value (vLLM's "not loaded" marker) means the checkpoint held one
        scale for the fused module already, and the weight is returned unchanged.
      logical_widths: rows per shard.

    Returns:
      `(max_w_scale, weight)`: a `()` float32 scale and the requantized `(N, K)` fp8 weight.
    """
    validation.check_fp8("weight", weight)
    weight_scale = validation.as_scale("weight_scale", weight_scale).reshape(-1)
    _check_shards(weight_scale, logical_widths, rows=weight.shape[0])
    not_loaded = float(jnp.finfo(weight.dtype).min)
    if not isinstance(weight_scale, jax.core.Tracer):
        values = np.asarray(weight_scale)
        validation.check_scale_values("weight_scale", values[values != not_loaded])
    max_w_scale = jnp.max(weight_scale)
    unfused_module_in_checkpoint = weight_scale[-1] > not_loaded
    shard_scales = jnp.repeat(
        weight_scale[: len(logical_widths)], np.asarray(logical_widths), total_repeat_length=weight.shape[0]
    )
    dequantized = per_tensor_dequantize(weight, shard_scales[:, None])
    requantized = quantization.quantize_per_tensor(dequantized, max_w_scale, weight.dtype)
    return max_w_scale, jnp.where(unfused_module_in_checkpoint, requantized, weight)


def convert_to_channelwise(weight_scale: jax.Array, logical_widths: Sequence[int]) -> jax.Array:
    """Expands per-shard scales `(S,)` to per-channel scales `(sum(logical_widths), 1)` float32."""
    weight_scale = validation.as_scale("weight_scale", weight_scale).reshape(-1)
    _check_shards(weight_scale, logical_widths)
    validation.check_scale_values("weight_scale", weight_scale[: len(logical_widths)])
    total = int(sum(logical_widths))
    return jnp.repeat(
        weight_scale[: len(logical_widths)], np.asarray(logical_widths), total_repeat_length=total
    ).reshape(total, 1)


def normalize_e4m3fn_to_e4m3fnuz(
    weight: jax.Array, weight_scale: jax.Array, input_scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Reinterprets e4m3fn codes as e4m3fnuz (ROCm) with doubled scales; same dequantized values.

    The same bits are worth half as much in e4m3fnuz, so scales double. The bit pattern 0x80 is
    -0 in e4m3fn but NaN in e4m3fnuz; it becomes +0.
    """
    if np.dtype(weight.dtype) != np.dtype(dtypes.FP8_E4M3FN):
        raise TypeError(f"weight must be float8_e4m3fn, got {np.dtype(weight.dtype).name}")
    validation.check_fp8("weight", weight)
    bits = jax.lax.bitcast_convert_type(weight, jnp.int8)
    bits = jnp.where(bits == -128, jnp.int8(0), bits)
    weight = jax.lax.bitcast_convert_type(bits, dtypes.FP8_E4M3FNUZ)
    weight_scale = validation.as_scale("weight_scale", weight_scale)
    validation.check_scale_values("weight_scale", weight_scale)
    weight_scale = weight_scale * 2.0
    if input_scale is not None:
        input_scale = validation.as_scale("input_scale", input_scale)
        validation.check_scale_values("input_scale", input_scale)
        input_scale = input_scale * 2.0
    return weight, weight_scale, input_scale


def fuse_fp8_shards(
    shards: Sequence[tuple[jax.Array, jax.Array]], weight_granularity: str
) -> tuple[jax.Array, jax.Array]:
    """Stacks fp8 shards (Q, K, V or gate, up) into one fused `(sum N_i, K)` weight, as vLLM loads them.

    Args:
      shards: `(weight (N_i, K) fp8, weight_scale)` per shard; scales `(1,)` (or scalar) per tensor,
        or `(N_i, 1)` per channel.
      weight_granularity: "per_tensor": per-tensor shard scales become their max and the shards are
        requantized to it (`requantize_with_max_scale`); "per_channel": per-tensor shard scales are
        expanded to one per row (`convert_to_channelwise`, codes unchanged) and concatenated with
        the per-channel ones.

    Returns:
      `(weight (sum N_i, K) fp8, weight_scale (1,) | (sum N_i, 1) float32)`.
    """
    if weight_granularity not in ("per_tensor", "per_channel"):
        raise ValueError(f"weight_granularity must be 'per_tensor' or 'per_channel', got {weight_granularity!r}")
    if not shards:
        raise ValueError("shards must hold at least one (weight, weight_scale) pair")
    weights = [w for w, _ in shards]
    scales = [jnp.asarray(s, jnp.float32) for _, s in shards]
    widths = [int(w.shape[0]) for w in weights]
    weight = jnp.concatenate(weights, axis=0)
    per_tensor_shards = all(s.size == 1 for s in scales)
    if weight_granularity == "per_tensor":
        if not per_tensor_shards:
            raise ValueError("weight_granularity='per_tensor' needs per-tensor shard scales (one value each)")
        max_scale, weight = requantize_with_max_scale(weight, jnp.stack([s.reshape(()) for s in scales]), widths)
        return weight, max_scale.reshape(1)
    if per_tensor_shards:
        return weight, convert_to_channelwise(jnp.stack([s.reshape(()) for s in scales]), widths)
    row_scales = []
    for index, (scale, rows) in enumerate(zip(scales, widths)):
        if scale.size == 1:  # a per-tensor shard among per-channel ones: one scale per row
            row_scales.append(convert_to_channelwise(scale.reshape(1), [rows]))
        elif scale.size == rows:
            row_scales.append(scale.reshape(rows, 1))
        else:
            raise ValueError(
                f"shard {index}: weight_scale of shape {tuple(scale.shape)} is neither per tensor nor per "
                f"channel for its {rows} rows"
            )
    return weight, jnp.concatenate(row_scales, axis=0)


def fuse_block_fp8_shards(
    shards: Sequence[tuple[jax.Array, jax.Array]], block_size: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Stacks block-scaled fp8 shards (Q, K, V or gate, up) into one fused weight, codes and scales
    unchanged, as vLLM loads them.

    Args:
      shards: `(weight (N_i, K) fp8, weight_scale (ceil(N_i / bn), ceil(K / bk)))` per shard.
      block_size: `(bn, bk)`.

    Every shard but the last must span whole blocks (N_i a multiple of bn): a shard ending inside a
    block would share that block's one scale with the next shard, which its codes do not hold.

    Returns:
      `(weight (sum N_i, K) fp8, weight_scale (ceil(sum N_i / bn), ceil(K / bk)) float32)`.
    """
    bn, bk = block_size
    if not shards:
        raise ValueError("shards must hold at least one (weight, weight_scale) pair")
    widths = [int(w.shape[0]) for w, _ in shards]
    if any(width % bn for width in widths[:-1]):
        raise ValueError(
            f"fused block fp8 shards must be multiples of the weight block's bn={bn} (but the last), got widths "
            f"{widths}: a shard ending inside a block cannot share its scale; keep them as separate layers"
        )
    scales = []
    for index, (weight, scale) in enumerate(shards):
        scale = validation.as_scale(f"shard {index} weight_scale", scale)
        validation.check_block_scale(
            f"shard {index} weight_scale", scale, weight.shape[0], weight.shape[1], block_size, "its weight"
        )
        scales.append(scale)
    return jnp.concatenate([w for w, _ in shards], axis=0), jnp.concatenate(scales, axis=0)
