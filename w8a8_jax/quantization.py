"""Activation quantization to fp8: static, dynamic per-tensor and dynamic per-token (vLLM's formulas).

For a fp8 dtype with clamp bound `max` (448 for e4m3fn, 224 for e4m3fnuz):
  static / dynamic per-tensor: q = fp8(clamp(x * (1 / s), -max, max))
      dynamic per-tensor s = amax(|x|) / max   (all-zero input: s = 1 / (max * 512))
  dynamic per-token:           q = fp8(clamp(x / s_m, -max, max))
      s_m = max(min(amax_m, scale_ub) / max, 1 / (max * 512)), one per row
All arithmetic is float32; the cast rounds to nearest even. Codes are bit-identical to vLLM's CUDA
kernels for the same scale.
"""

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, platform, validation


def true_divide(numerator, denominator) -> jax.Array:
    """`numerator / denominator` correctly rounded to float32, as IEEE division gives it.

    XLA does not give it directly: it rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, and
    on GPU it lowers float32 division to an approximate instruction (`div.full`, up to 2 ulp); each
    changes the last bit of many quotients and so, near fp8 rounding ties, the codes. So the
    division runs in float64 (IEEE on every XLA backend) and rounds once to float32, which is
    exact for division since 53 >= 2 * 24 + 2 (Figueroa). Adding `0 * numerator` to the divisor
    keeps the broadcast rewrite away (float `0 * a` is not folded). TPUs have no native float64:
    there the division stays float32.
    """
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    if jax.default_backend() == "tpu":
        return numerator / (denominator + 0 * numerator)
    with jax.enable_x64(True):
        wide_numerator = numerator.astype(jnp.float64)
        quotient = wide_numerator / (denominator.astype(jnp.float64) + 0 * wide_numerator)
        return quotient.astype(jnp.float32)


def _to_fp8(scaled: jax.Array, fp8_dtype) -> jax.Array:
    bound = dtypes.fp8_max(fp8_dtype)
    return jnp.clip(scaled, -bound, bound).astype(fp8_dtype)


def quantize_per_tensor(x: jax.Array, scale: jax.Array, fp8_dtype) -> jax.Array:
    """`x (M, K)` float, `scale ()` float32 -> codes `(M, K)` fp8, multiplying by `1 / scale`."""
    inverse_scale = true_divide(1.0, scale)
    return _to_fp8(x.astype(jnp.float32) * inverse_scale, fp8_dtype)


def dynamic_per_tensor_scale(x: jax.Array, fp8_dtype) -> jax.Array:
    """`amax(|x|) / max` as float32 `()`; a tensor whose amax gives no normal scale gets the floor."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = true_divide(amax, jnp.float32(dtypes.fp8_max(fp8_dtype)))
    # vLLM leaves s = 0 for an all-zero tensor (then 0 * inf = NaN codes); take the floor instead.
    return jnp.where(scale >= np.finfo(np.float32).tiny, scale, jnp.float32(dtypes.min_scaling_factor(fp8_dtype)))


def quantize_per_token(
    x: jax.Array, scale_ub: jax.Array | None, fp8_dtype, *, row_amax: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`x (M, K)` float -> codes `(M, K)` fp8 and scales `(M, 1)` float32, one per row.

    `row_amax (M, 1)` float32 replaces the rows' amax of `x` where the rows extend beyond `x`
    (the K shards of a row-parallel layer, reduced with `pmax`).
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True) if row_amax is None else row_amax
    if scale_ub is not None:
        amax = jnp.minimum(amax, scale_ub.reshape(()))
    scale = jnp.maximum(
        true_divide(amax, jnp.float32(dtypes.fp8_max(fp8_dtype))),
        jnp.float32(dtypes.min_scaling_factor(fp8_dtype)),
    )
    return _to_fp8(true_divide(x, scale), fp8_dtype), scale


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
    fp8_dtype = platform.fp8_dtype() if fp8_dtype is None else np.dtype(fp8_dtype)
    if not dtypes.is_fp8(fp8_dtype):
        raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
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
        q = quantize_per_tensor(input, scale[0], fp8_dtype)
    elif per_token:
        kernel = platform.fused_kernel()
        if kernel is not None and kernel.per_token_quant is not None:
            q, scale = kernel.per_token_quant(input, scale_ub, fp8_dtype)
        else:
            q, scale = quantize_per_token(input, scale_ub, fp8_dtype)
    else:
        scale = dynamic_per_tensor_scale(input, fp8_dtype).reshape(1)
        q = quantize_per_tensor(input, scale[0], fp8_dtype)

    padding = 0 if num_token_padding is None else max(0, num_token_padding - input.shape[0])
    if padding:
        q = jnp.pad(q, ((0, padding), (0, 0)))
        if per_token:
            scale = jnp.pad(scale, ((0, padding), (0, 0)))
    return q, scale
