"""Activation quantization to fp8: static, dynamic per-tensor and dynamic per-token (vLLM's formulas).

For a fp8 dtype with clamp bound `max` (448 for e4m3fn, 224 for e4m3fnuz):
  static / dynamic per-tensor: q = fp8(clamp(x * (1 / s), -max, max))
      dynamic per-tensor s = amax(|x|) / max   (all-zero input: s = 1 / (max * 512))
  dynamic per-token:           q = fp8(clamp(x / s_m, -max, max))
      s_m = max(min(amax_m, scale_ub) / max, 1 / (max * 512)), one per row
  dynamic per-token group:     q = fp8(clamp(x / s_mg, -max, max))
      s_mg = max(amax_mg, eps) / max, one per row and group of G along K (the last group may be
      partial), optionally floored at 1e-10 and rounded up to a power of two (UE8M0); vLLM's `per_token_group_quant_fp8`
All arithmetic is float32; the cast rounds to nearest even. Codes are bit-identical to vLLM's CUDA
kernels for the same scale.

Weights: per tensor and per channel as the dynamic per-tensor and per-token formulas; in blocks of
`(bn, bk)` with the dynamic per-tensor scale of each block, `s_b = amax_b / max` (`scale_from_amax`:
the floor only where that is no normal float32, e.g. an all-zero block), and codes by division,
`q = fp8(clamp(w / s_b))`.

Non-finite inputs stay where they are: the amax is taken over the finite values only (`finite_amax`),
so a scale is always finite and > 0; a NaN element becomes a NaN code (its token's outputs are NaN)
and ±Inf saturates to ±max. No other element's code or scale changes. Weights (`quantize_weight`), calibrated static scales
(`static_input_scale`) and every activation path (`quantize_activation`: the op, `scaled_fp8_quant`
and the row-parallel layer) use these formulas and no others.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from w8a8_jax import dispatch, dtypes, layout, platform, validation
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.platform import FusedKernel


def true_divide(numerator, denominator, *, in_kernel: bool = False) -> jax.Array:
    """`numerator / denominator` correctly rounded to float32, as IEEE division gives it.

    XLA does not give it directly: it rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, and
    on GPU it lowers float32 division to an approximate instruction (`div.full`, up to 2 ulp); each
    changes the last bit of many quotients and so, near fp8 rounding ties, the codes. So the
    division runs in float64 (IEEE on every XLA backend) and rounds once to float32, which is
    exact for division since 53 >= 2 * 24 + 2 (Figueroa). Adding `0 * numerator` to the divisor
    keeps the broadcast rewrite away (float `0 * a` is not folded). The divisor is rounded to
    float32 again in float64 (`reduce_precision`) because XLA drops a float64 -> float32 -> float64
    round trip (excess precision): on the H200 a group scale, itself a `true_divide`, reached the
    division unrounded, and 46 of 7.3 million codes moved by one step at rounding ties. (The
    divisors here are scales and fp8 bounds, normal floats: `reduce_precision` flushes subnormals.)
    `in_kernel`: inside a Pallas kernel, which XLA does not rewrite (and Mosaic GPU has no
    `reduce_precision`). TPUs have no native float64: there the division stays float32.
    """
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    # `0 * ±inf` is NaN: the zero is taken of the numerator clamped to the finite range instead.
    bound = float(np.finfo(np.float32).max)
    zero = 0 * jnp.clip(numerator, -bound, bound)
    if jax.default_backend() == "tpu":
        return numerator / (denominator + zero)
    with jax.enable_x64(True):
        divisor = denominator.astype(jnp.float64)
        if not in_kernel:
            divisor = lax.reduce_precision(divisor, exponent_bits=8, mantissa_bits=23)
        quotient = numerator.astype(jnp.float64) / (divisor + zero.astype(jnp.float64))
        return quotient.astype(jnp.float32)


AmaxReduce = Callable[[jax.Array], jax.Array]


def _to_fp8(scaled: jax.Array, fp8_dtype) -> jax.Array:
    bound = dtypes.fp8_max(fp8_dtype)
    return jnp.clip(scaled, -bound, bound).astype(fp8_dtype)


def finite_amax(x: jax.Array, axis: int | None = None) -> jax.Array:
    """max |x| over the finite elements of `x` (0 where there are none), float32; over `axis`
    (kept, size 1) or the whole array. NaN and ±Inf are skipped, as CUDA's `fmaxf` skips NaN."""
    magnitude = jnp.abs(x.astype(jnp.float32))
    magnitude = jnp.where(magnitude < jnp.inf, magnitude, 0)  # False for NaN and Inf
    return jnp.max(magnitude, axis=axis, keepdims=axis is not None, initial=0.0)


def scale_from_amax(amax: jax.Array, fp8_dtype) -> jax.Array:
    """`amax / max` in float32 (shape of `amax`); an amax that gives no normal scale gets the floor.

    vLLM leaves s = 0 for an all-zero tensor (then 0 * inf = NaN codes); we take the floor
    `1 / (max * 512)` instead.
    """
    scale = true_divide(jnp.asarray(amax, jnp.float32), jnp.float32(dtypes.fp8_max(fp8_dtype)))
    return jnp.where(scale >= np.finfo(np.float32).tiny, scale, jnp.float32(dtypes.min_scaling_factor(fp8_dtype)))


def static_input_scale(input_amax, fp8_dtype) -> jax.Array:
    """A calibrated static activation scale `(1,)` float32 from the amax seen over calibration data:
    the dynamic per-tensor formula applied to it."""
    return scale_from_amax(jnp.asarray(input_amax, jnp.float32).reshape(1), fp8_dtype)


def quantize_per_tensor(x: jax.Array, scale: jax.Array, fp8_dtype) -> jax.Array:
    """`x (M, K)` float, `scale ()` float32 -> codes `(M, K)` fp8, multiplying by `1 / scale`."""
    inverse_scale = true_divide(1.0, scale)
    return _to_fp8(x.astype(jnp.float32) * inverse_scale, fp8_dtype)


def quantize_dynamic_per_tensor(
    x: jax.Array, fp8_dtype, *, reduce_amax: AmaxReduce | None = None
) -> tuple[jax.Array, jax.Array]:
    """`x (M, K)` float -> codes `(M, K)` fp8 and one scale `(1,)` float32 from the amax of `x`.

    `reduce_amax` combines the amax with other shards' (e.g. a `pmax` over a row-parallel axis).
    """
    amax = finite_amax(x)
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    scale = scale_from_amax(amax, fp8_dtype)
    return quantize_per_tensor(x, scale, fp8_dtype), scale.reshape(1)


def quantize_per_token(
    x: jax.Array, scale_ub: jax.Array | None, fp8_dtype, *, reduce_amax: AmaxReduce | None = None
) -> tuple[jax.Array, jax.Array]:
    """`x (M, K)` float -> codes `(M, K)` fp8 and scales `(M, 1)` float32, one per row.

    `reduce_amax` combines each row's amax `(M, 1)` with other shards' (the K shards of a
    row-parallel layer, reduced with `pmax`).
    """
    x = x.astype(jnp.float32)
    amax = finite_amax(x, axis=1)
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    if scale_ub is not None:
        amax = jnp.minimum(amax, scale_ub.reshape(()))
    scale = jnp.maximum(
        true_divide(amax, jnp.float32(dtypes.fp8_max(fp8_dtype))),
        jnp.float32(dtypes.min_scaling_factor(fp8_dtype)),
    )
    return _to_fp8(true_divide(x, scale), fp8_dtype), scale


# vLLM's default floor on a group's amax, and its floor on a scale it rounds to a power of two.
GROUP_EPS = 1e-10
UE8M0_SCALE_FLOOR = 1e-10


def round_up_to_power_of_two(scale: jax.Array) -> jax.Array:
    """The smallest power of two >= each (positive, finite) float32 `scale`, exactly (UE8M0 scales)."""
    mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return jnp.ldexp(jnp.ones_like(scale), exponent)


def _pad_last(x: jax.Array, multiple: int) -> jax.Array:
    pad = layout.num_blocks(x.shape[-1], multiple) * multiple - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, pad))) if pad else x


def quantize_per_token_group(
    x: jax.Array,
    group_size: int,
    fp8_dtype,
    *,
    eps: float = GROUP_EPS,
    use_ue8m0: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`x (M, K)` float -> codes `(M, K)` fp8 and scales `(M, ceil(K / group_size))` float32.

    One scale per row and group of `group_size` consecutive elements along K, the last group
    partial where K is not a multiple. (A row-parallel layer's K shards hold whole groups, so each
    shard quantizes its own, with no reduction across shards.)
    """
    m, k = x.shape
    groups = layout.num_blocks(k, group_size)
    x = x.astype(jnp.float32)
    if groups > 1:  # one group stays 2-D: (M, K) rows, the layout a kernel's tile has
        x = _pad_last(x, group_size).reshape(m, groups, group_size)  # zeros leave an amax
    amax = finite_amax(x, axis=x.ndim - 1)  # (M, G, 1) or (M, 1)
    scale = true_divide(jnp.maximum(amax, jnp.float32(eps)), jnp.float32(dtypes.fp8_max(fp8_dtype)))
    if use_ue8m0:  # vLLM floors the scale at 1e-10 before rounding it to a power of two
        scale = round_up_to_power_of_two(jnp.maximum(scale, jnp.float32(UE8M0_SCALE_FLOOR)))
    codes = _to_fp8(true_divide(x, scale), fp8_dtype).reshape(m, -1)
    return codes[:, :k], scale.reshape(m, groups)


def expand_block_scale(scale: jax.Array, block_size: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
    """A block scale `(ceil(N / bn), ceil(K / bk))` as the `(N, K)` array of each element's scale."""
    (bn, bk), (n, k) = block_size, shape
    return jnp.repeat(jnp.repeat(scale, bn, axis=0)[:n], bk, axis=1)[:, :k]


def dequantize_weight(weight: jax.Array, weight_scale: jax.Array, block_size: tuple[int, int] | None = None):
    """`weight (N, K)` fp8 and its scale -> the float32 weight `(N, K)` it stands for.

    `weight_scale` is `(1,)` or `(N, 1)` (block_size None) or `(ceil(N / bn), ceil(K / bk))`.
    """
    weight = weight.astype(jnp.float32)
    if block_size is None:
        return weight * weight_scale.reshape(-1, 1)
    return weight * expand_block_scale(weight_scale, block_size, weight.shape)


def quantize_block_weight(weight: jax.Array, block_size: tuple[int, int], fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """A float weight `(N, K)` -> codes `(N, K)` fp8 and scales `(ceil(N / bn), ceil(K / bk))` float32."""
    (n, k), (bn, bk) = weight.shape, block_size
    row_blocks, col_blocks = layout.num_blocks(n, bn), layout.num_blocks(k, bk)
    padded = _pad_last(weight.astype(jnp.float32), bk)
    padded = jnp.pad(padded, ((0, row_blocks * bn - n), (0, 0))).reshape(row_blocks, bn, col_blocks, bk)
    amax = jnp.max(finite_amax(padded, axis=3), axis=1)[..., 0]  # (row_blocks, col_blocks)
    scale = scale_from_amax(amax, fp8_dtype)
    codes = _to_fp8(true_divide(padded, scale[:, None, :, None]), fp8_dtype)
    return codes.reshape(row_blocks * bn, col_blocks * bk)[:n, :k], scale


def quantize_activation(
    x: jax.Array,
    activation_scheme: str,
    *,
    input_scale: jax.Array | None,
    scale_ub: jax.Array | None,
    fp8_dtype,
    reduce_amax: AmaxReduce | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`x (M, K)` float -> `(codes (M, K), scale)` by the XLA formula of `activation_scheme`.

    "static": `input_scale (1,)` given, returned as the scale; "dynamic_per_tensor": scale `(1,)`;
    "dynamic_per_token": scales `(M, 1)`, bounded by `scale_ub (1,)` if given.
    ("dynamic_per_token_group" needs its group size: `quantize_per_token_group`.)
    """
    if activation_scheme == "static":
        return quantize_per_tensor(x, input_scale.reshape(()), fp8_dtype), input_scale.reshape(1)
    if activation_scheme == "dynamic_per_tensor":
        return quantize_dynamic_per_tensor(x, fp8_dtype, reduce_amax=reduce_amax)
    return quantize_per_token(x, scale_ub, fp8_dtype, reduce_amax=reduce_amax)


_SCHEME_OF_XLA_QUANTIZER = {name: scheme for scheme, name in dispatch.XLA_QUANTIZERS.items()}


def run_quantizer(
    name: str,
    kernel: FusedKernel | None,
    x: jax.Array,
    input_scale: jax.Array | None,
    scale_ub: jax.Array | None,
    fp8_dtype,
) -> tuple[jax.Array, jax.Array]:
    """Runs the quantizer a `dispatch.Plan` names (not "kernel.quant_scaled_mm", which is a GEMM)."""
    if name == dispatch.KERNEL_PER_TOKEN_QUANT:
        return kernel.per_token_quant(x, scale_ub, fp8_dtype)
    return quantize_activation(
        x, _SCHEME_OF_XLA_QUANTIZER[name], input_scale=input_scale, scale_ub=scale_ub, fp8_dtype=fp8_dtype
    )


def quantize_weight(
    weight: jax.Array,
    weight_granularity: str,
    fp8_dtype,
    *,
    block_size: tuple[int, int] | None = None,
    name: str = "weight",
) -> tuple[jax.Array, jax.Array]:
    """A float weight `(N, K)` -> fp8 codes `(N, K)` and float32 `weight_scale`.

    The scale is `amax / fp8_max` over the whole weight (`(1,)`, "per_tensor"), over each output
    channel (`(N, 1)`, "per_channel"), or over each `block_size` block (`(ceil(N / bn), ceil(K /
    bk))`, "block"): vLLM's online weight quantization (the dynamic per-tensor formula, the
    per-token one on the `(N, K)` rows, or the per-tensor scale of each block with codes by division). A concrete weight must be finite (a NaN or Inf
    would silently shrink or skip its scale); `name` names it in the errors.
    """
    weight = jnp.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"{name} must be (N, K) with N, K >= 1, got shape {tuple(weight.shape)}")
    validation.check_finite(name, weight, ": weights must be finite to be quantized")
    if weight_granularity == "per_channel":
        return quantize_per_token(weight, None, fp8_dtype)
    if weight_granularity == "per_tensor":
        return quantize_dynamic_per_tensor(weight, fp8_dtype)
    if weight_granularity == "block":
        return quantize_block_weight(weight, scheme_lib.check_block_size(block_size), fp8_dtype)
    raise ValueError(f"weight_granularity must be 'per_tensor', 'per_channel' or 'block', got {weight_granularity!r}")


def scaled_fp8_quant(
    input: jax.Array,
    scale: jax.Array | float | None = None,
    num_token_padding: int | None = None,
    scale_ub: jax.Array | None = None,
    use_per_token_if_dynamic: bool = False,
    *,
    fp8_dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes `input (M, K)` (bf16/f16/f32) to fp8, as vLLM's `ops.scaled_fp8_quant`.

    Args:
      input: `(M, K)` bfloat16, float16 or float32.
      scale: static scale, shape `()` or `(1,)`; None quantizes dynamically.
      num_token_padding: the output has `max(M, num_token_padding)` rows; padding rows hold zero
        codes and zero scales.
      scale_ub: `(1,)` float32 upper bound on the per-token amax; only with dynamic per-token
        (vLLM ignores it elsewhere; we reject it rather than drop it silently).
      use_per_token_if_dynamic: dynamic scales per row `(M, 1)` instead of one `(1,)`.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz; default the platform's (`platform.fp8_dtype()`).

    Returns:
      `(q, scale)`: q `(max(M, num_token_padding), K)` fp8; scale float32 `(1,)` (static, dynamic
      per-tensor) or `(rows, 1)` (dynamic per-token).
    """
    validation.check_float_input("input", input, ndim=2)
    fp8_dtype = platform.resolve_fp8_dtype(fp8_dtype)
    if num_token_padding is not None and (not isinstance(num_token_padding, int) or num_token_padding < 0):
        raise ValueError(f"num_token_padding must be a non-negative int or None, got {num_token_padding!r}")
    per_token = scale is None and use_per_token_if_dynamic
    if scale_ub is not None:
        if not per_token:
            raise ValueError(
                "scale_ub applies only to dynamic per-token quantization (scale=None, use_per_token_if_dynamic=True)"
            )
        scale_ub = validation.per_tensor_scale("scale_ub", scale_ub)

    if scale is not None:
        scale = validation.per_tensor_scale("scale", scale)
    activation_scheme = "static" if scale is not None else "dynamic_per_token" if per_token else "dynamic_per_tensor"
    kernel = platform.fused_kernel()
    quantizer, _ = dispatch.choose_quantizer(activation_scheme, input.shape[1], input.dtype, fp8_dtype, kernel)
    q, scale = run_quantizer(quantizer, kernel, input, scale, scale_ub, fp8_dtype)

    padding = 0 if num_token_padding is None else max(0, num_token_padding - input.shape[0])
    if padding:
        q = jnp.pad(q, ((0, padding), (0, 0)))
        if per_token:
            scale = jnp.pad(scale, ((0, padding), (0, 0)))
    return q, scale


def per_token_group_quant_fp8(
    input: jax.Array,
    group_size: int,
    eps: float = GROUP_EPS,
    *,
    column_major_scales: bool = False,
    use_ue8m0: bool = False,
    fp8_dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes `input (..., K)` per token in groups of `group_size` along K, as vLLM's
    `per_token_group_quant_fp8` (the activations of DeepSeek-V3-style block fp8 layers).

    `s = max(amax(|group|), eps) / fp8_max` per token and group (the last group partial where K is
    not a multiple), with `use_ue8m0` floored at 1e-10 and rounded up to a power of two; `q = fp8(clamp(x / s))` with
    correctly rounded division. Codes and scales are bit-identical to vLLM's kernel's.

    Args:
      input: `(..., K)` bfloat16, float16 or float32, K >= 1.
      group_size: G, elements per group (128 for DeepSeek-V3).
      eps: floor on a group's amax (vLLM's default 1e-10), finite and > 0.
      column_major_scales: accepted for vLLM's signature; a JAX array has no strides, so the scales
        are the same `(..., ceil(K / G))` array either way (XLA picks their layout).
      use_ue8m0: round each scale, floored at 1e-10, up to a power of two (DeepGEMM's UE8M0 scales).
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz; default the platform's.

    Returns:
      `(q, scale)`: q `(..., K)` fp8; scale `(..., ceil(K / G))` float32.
    """
    validation.check_float_input("input", input)
    if input.ndim < 1 or input.shape[-1] == 0:
        raise ValueError(f"input must be (..., K) with K >= 1, got shape {tuple(input.shape)}")
    validation.check_group_size("group_size", group_size)
    if isinstance(eps, bool) or not (isinstance(eps, int | float | np.floating) and np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    del column_major_scales
    fp8_dtype = platform.resolve_fp8_dtype(fp8_dtype)
    lead, k = input.shape[:-1], input.shape[-1]
    q, scale = quantize_per_token_group(input.reshape(-1, k), group_size, fp8_dtype, eps=eps, use_ue8m0=bool(use_ue8m0))
    return q.reshape(*lead, k), scale.reshape(*lead, scale.shape[-1])
