"""What linen's and nnx's `Fp8Dense` share: the scheme, weight quantization and the call itself.

Both module families and the converter call these functions, so the two `Fp8Dense` classes are thin
parameter holders over one functional core (`Fp8LinearOp`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, platform, quantization, weight_utils
from w8a8_jax.linear import Fp8LinearOp

WeightGranularity = Literal["per_tensor", "per_channel"]
ActivationScheme = Literal["static", "dynamic_per_tensor", "dynamic_per_token"]
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACTIVATION_SCHEMES = ("static", "dynamic_per_tensor", "dynamic_per_token")


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """How one fp8 layer quantizes: its weight granularity, activation scheme and call options.

    Attributes:
      weight_granularity: "per_tensor" (`weight_scale (1,)`) or "per_channel" (`(N, 1)`).
      activation_scheme: "static" (calibrated `input_scale (1,)`), "dynamic_per_tensor" or
        "dynamic_per_token" (scales computed from each input).
      scale_ub: upper bound on a token's amax; dynamic per-token only.
      fused: allow the fused Pallas kernel; None detects it.
    """

    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    fused: bool | None = None

    def __post_init__(self):
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}, got {self.activation_scheme!r}")
        if self.scale_ub is not None and self.activation_scheme != "dynamic_per_token":
            raise ValueError(
                f"scale_ub applies only to activation_scheme='dynamic_per_token', got {self.activation_scheme!r}"
            )
        if self.scale_ub is not None and not (np.isfinite(self.scale_ub) and self.scale_ub > 0):
            raise ValueError(f"scale_ub must be finite and > 0, got {self.scale_ub}")

    @property
    def is_static(self) -> bool:
        return self.activation_scheme == "static"


def resolve_fp8_dtype(fp8_dtype) -> np.dtype:
    """`fp8_dtype`, or the platform's (e4m3fnuz on ROCm, else e4m3fn) when None."""
    fp8_dtype = platform.fp8_dtype() if fp8_dtype is None else np.dtype(fp8_dtype)
    if not dtypes.is_fp8(fp8_dtype):
        raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    return fp8_dtype


def quantize_weight(
    kernel: jax.Array, weight_granularity: WeightGranularity, fp8_dtype=None
) -> tuple[jax.Array, jax.Array]:
    """A float Flax kernel `(K, N)` -> fp8 `weight (N, K)` and float32 `weight_scale`.

    The scale is `amax / fp8_max` over the whole weight (`(1,)`, "per_tensor") or over each output
    channel (`(N, 1)`, "per_channel"): vLLM's online weight quantization (`scaled_fp8_quant` of the
    weight, dynamic per-tensor, or per-token on the `(N, K)` rows), so the formula lives in one place.
    """
    if weight_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {weight_granularity!r}")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be (K, N), got shape {tuple(kernel.shape)}")
    return quantization.scaled_fp8_quant(
        jnp.asarray(kernel).T,
        use_per_token_if_dynamic=weight_granularity == "per_channel",
        fp8_dtype=resolve_fp8_dtype(fp8_dtype),
    )


def static_input_scale(input_amax, fp8_dtype=None) -> jax.Array:
    """A calibrated static activation scale `(1,)` float32 from the observed input amax.

    `amax / fp8_max`, the dynamic per-tensor formula applied to the amax of all calibration batches
    (an amax of 0 gets the same floor as an all-zero dynamic tensor).
    """
    amax = jnp.asarray(input_amax, jnp.float32).reshape(1)
    return quantization.dynamic_per_tensor_scale(amax, resolve_fp8_dtype(fp8_dtype)).reshape(1)


def fp8_params(
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    scheme: Fp8Scheme,
    input_scale: jax.Array | None = None,
    fp8_dtype=None,
    shard_widths: Sequence[int] | None = None,
) -> dict[str, jax.Array]:
    """A float `(K, N)` kernel (and bias) as an `Fp8Dense`'s parameters, keyed as both modules name them.

    Returns `weight (N, K)` fp8, `weight_scale`, `input_scale (1,)` (static scheme only: the given
    calibrated scale, or 1.0 until calibration) and `bias` (if given, unchanged).

    `shard_widths` marks a fused projection (QKV, gate/up: the kernel's N split into shards): each
    shard is quantized per tensor with its own scale, as separately stored shards are, and the
    shards are fused as vLLM does (`fuse_fp8_shards`).
    """
    if shard_widths is None:
        weight, weight_scale = quantize_weight(kernel, scheme.weight_granularity, fp8_dtype)
    else:
        if sum(shard_widths) != kernel.shape[1]:
            raise ValueError(f"shard_widths must sum to the kernel's N={kernel.shape[1]}, got {list(shard_widths)}")
        splits = np.cumsum(shard_widths)[:-1]
        shards = [quantize_weight(shard, "per_tensor", fp8_dtype) for shard in jnp.split(kernel, splits, axis=1)]
        weight, weight_scale = fuse_fp8_shards(shards, scheme.weight_granularity)
    params = {"weight": weight, "weight_scale": weight_scale}
    if scheme.is_static:
        params["input_scale"] = (
            jnp.ones((1,), jnp.float32) if input_scale is None else jnp.asarray(input_scale, jnp.float32).reshape(1)
        )
    if bias is not None:
        params["bias"] = jnp.asarray(bias)
    return params


def fuse_fp8_shards(
    shards: Sequence[tuple[jax.Array, jax.Array]], weight_granularity: WeightGranularity
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
    if weight_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {weight_granularity!r}")
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
        max_scale, weight = weight_utils.requantize_with_max_scale(
            weight, jnp.stack([s.reshape(()) for s in scales]), widths
        )
        return weight, max_scale.reshape(1)
    if per_tensor_shards:
        return weight, weight_utils.convert_to_channelwise(jnp.stack([s.reshape(()) for s in scales]), widths)
    row_scales = []
    for index, (scale, rows) in enumerate(zip(scales, widths)):
        if scale.size == 1:  # a per-tensor shard among per-channel ones: one scale per row
            row_scales.append(weight_utils.convert_to_channelwise(scale.reshape(1), [rows]))
        elif scale.size == rows:
            row_scales.append(scale.reshape(rows, 1))
        else:
            raise ValueError(
                f"shard {index}: weight_scale of shape {tuple(scale.shape)} is neither per tensor nor per "
                f"channel for its {rows} rows"
            )
    return weight, jnp.concatenate(row_scales, axis=0)


def fp8_dense(
    inputs: jax.Array,
    *,
    weight: jax.Array,
    weight_scale: jax.Array,
    input_scale: jax.Array | None,
    bias: jax.Array | None,
    scheme: Fp8Scheme,
    out_dtype=None,
) -> jax.Array:
    """`inputs (..., K)` -> `(..., N)`: `input_scale * weight_scale * (q(inputs) @ weight.T) + bias`.

    The call both `Fp8Dense` classes make: `Fp8LinearOp.apply` configured by `scheme`.
    `weight (N, K)` fp8; `weight_scale (1,) | (N, 1)`; `input_scale (1,)` for the static scheme,
    else ignored; out_dtype defaults to the input's dtype.
    """
    if scheme.is_static and input_scale is None:
        raise ValueError("activation_scheme='static' needs an input_scale (calibrate the layer)")
    op = Fp8LinearOp(
        fused_supported=scheme.fused, use_per_token_if_dynamic=scheme.activation_scheme == "dynamic_per_token"
    )
    scale_ub = None if scheme.scale_ub is None else jnp.full((1,), scheme.scale_ub, jnp.float32)
    return op.apply(
        inputs,
        weight,
        weight_scale,
        out_dtype=out_dtype,
        input_scale=input_scale if scheme.is_static else None,
        input_scale_ub=scale_ub,
        bias=bias,
    )


def fp8_dense_params(inputs: jax.Array, params: dict, *, scheme: Fp8Scheme, out_dtype=None) -> jax.Array:
    """`fp8_dense` on a parameter dict keyed as both modules name their parameters (`fp8_params`)."""
    return fp8_dense(
        inputs,
        weight=params["weight"],
        weight_scale=params["weight_scale"],
        input_scale=params.get("input_scale"),
        bias=params.get("bias"),
        scheme=scheme,
        out_dtype=out_dtype,
    )
