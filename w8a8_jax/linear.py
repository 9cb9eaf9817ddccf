"""`Fp8LinearOp`: quantize the activation, pick a scaled-GEMM path, run it (vLLM's Fp8LinearOp)."""

import functools

import jax
import numpy as np

from w8a8_jax import dtypes, platform, quantization, scaled_mm, validation

# Smallest row bucket; decode batches below it cost the same as it (the weight read dominates).
_MIN_BUCKET = 8
# Above 64 rows each power-of-two octave is cut into this many buckets: padding wastes at most
# 1/4 of the rows while M in 1..4096 compiles 28 programs.
_BUCKETS_PER_OCTAVE = 4


def bucket_rows(m: int) -> int:
    """The padded row count for `m` rows: powers of two up to 64, then 4 steps per octave."""
    if m <= 64:
        return max(_MIN_BUCKET, 1 << (m - 1).bit_length())
    step = (1 << (m - 1).bit_length()) // (2 * _BUCKETS_PER_OCTAVE)
    return -(-m // step) * step


@functools.partial(jax.jit, static_argnames=("out_dtype", "per_token", "fused"))
def _linear_2d(x, weight, weight_scale, input_scale, input_scale_ub, bias, *, out_dtype, per_token, fused):
    """`x (M, K)` float or fp8 -> `(M, N)` out_dtype; one program per shape and configuration."""
    kernel = platform.fused_kernel() if fused else None
    quantizes_per_row_or_static = not dtypes.is_fp8(x.dtype) and (input_scale is not None or per_token)
    if kernel is not None and kernel.quant_scaled_mm is not None and quantizes_per_row_or_static:
        return kernel.quant_scaled_mm(
            x, weight, weight_scale, input_scale=input_scale, scale_ub=input_scale_ub, bias=bias, out_dtype=out_dtype
        )
    if dtypes.is_fp8(x.dtype):
        qinput, x_scale = x, input_scale
    else:
        qinput, x_scale = quantization.scaled_fp8_quant(
            x, input_scale, scale_ub=input_scale_ub, use_per_token_if_dynamic=per_token, fp8_dtype=weight.dtype
        )
    gemm = select_gemm(fused, weight_scale, input_scale, per_token)
    return gemm(qinput, weight, x_scale, weight_scale, bias, out_dtype)


def select_gemm(fused: bool, weight_scale, input_scale, per_token: bool):
    """The scaled-GEMM path `dispatch_w8a8_scaled_mm` picks for a layer configured this way."""
    per_tensor_activations = input_scale is not None or not per_token
    return scaled_mm.dispatch_w8a8_scaled_mm(
        fused, validation.is_per_tensor(weight_scale), per_tensor_activations, per_token
    )


class Fp8LinearOp:
    """An fp8 W8A8 linear layer's computation, configured once and applied to any input.

    >>> op = Fp8LinearOp(use_per_token_if_dynamic=True)
    >>> y = op.apply(x, weight, weight_scale)   # x (..., K) bf16, weight (N, K) fp8 -> y (..., N) bf16

    Args:
      fused_supported: allow the fused Pallas kernel; None detects it (`platform.fused_fp8_supported`).
      use_per_token_if_dynamic: dynamic activation scales per token `(M, 1)` instead of per tensor.
      pad_output: pad the rows of eagerly called inputs up to a bucket (`bucket_rows`) so that a
        server running many batch sizes compiles a bounded number of programs; the padding is
        sliced off. None means True. Inside `jax.jit` the caller's shapes are already fixed and no
        padding is added.
    """

    def __init__(
        self,
        fused_supported: bool | None = None,
        use_per_token_if_dynamic: bool = False,
        pad_output: bool | None = None,
    ):
        if fused_supported is None:
            fused_supported = platform.fused_fp8_supported()
        elif fused_supported and not platform.fused_fp8_supported():
            raise ValueError("fused_supported=True, but no fused fp8 kernel runs on this device")
        self.fused_supported = fused_supported
        self.use_per_token_if_dynamic = use_per_token_if_dynamic
        self.pad_output = True if pad_output is None else pad_output

    def apply(
        self,
        input: jax.Array,
        weight: jax.Array,
        weight_scale: jax.Array,
        out_dtype=None,
        input_scale: jax.Array | None = None,
        input_scale_ub: jax.Array | None = None,
        bias: jax.Array | None = None,
        use_per_token_if_dynamic: bool | None = None,
    ) -> jax.Array:
        """`input (..., K)` -> `(..., N)`: `input_scale * weight_scale * (q(input) @ weight.T) + bias`.

        Args:
          input: `(..., K)` bf16/f16/f32, or fp8 codes already quantized with `input_scale`.
          weight: `(N, K)` fp8.
          weight_scale: `(1,)` per-tensor or `(N, 1)` per-channel float32.
          out_dtype: bf16, f16 or f32; default the input's dtype (bf16 for fp8 input).
          input_scale: `(1,)` static activation scale; None quantizes dynamically.
          input_scale_ub: `(1,)` upper bound on per-token amax (dynamic per-token only).
          bias: `(N,)` or None.
          use_per_token_if_dynamic: overrides the op's setting for this call.
        """
        per_token = self.use_per_token_if_dynamic if use_per_token_if_dynamic is None else use_per_token_if_dynamic
        validation.check_fp8("weight", weight)
        n, k = weight.shape
        if input.ndim < 1 or input.shape[-1] != k:
            raise ValueError(f"input must be (..., K) with K={k} (weight's last dim), got shape {tuple(input.shape)}")
        if dtypes.is_fp8(input.dtype):
            if input.dtype != weight.dtype:
                raise TypeError(f"fp8 input must have weight's dtype {weight.dtype}, got {input.dtype}")
            if input_scale is None:
                raise ValueError("fp8 input needs its input_scale")
        else:
            validation.check_float_input("input", input)
        if out_dtype is None:
            out_dtype = input.dtype if not dtypes.is_fp8(input.dtype) else np.dtype("bfloat16")
        out_dtype = validation.check_out_dtype(out_dtype)
        weight_scale = validation.as_scale("weight_scale", weight_scale)
        validation.check_row_scale("weight_scale", weight_scale, n, "output channel")
        validation.check_scale_values("weight_scale", weight_scale)
        if input_scale is not None:
            input_scale = validation.per_tensor_scale("input_scale", input_scale)
        if input_scale_ub is not None and (input_scale is not None or not per_token):
            raise ValueError("input_scale_ub applies only to dynamic per-token quantization")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")

        x = input.reshape(-1, k)
        rows = x.shape[0]
        if self.pad_output and not isinstance(x, jax.core.Tracer):
            x = jax.numpy.pad(x, ((0, bucket_rows(rows) - rows), (0, 0)))
        out = _linear_2d(
            x,
            weight,
            weight_scale,
            input_scale,
            input_scale_ub,
            bias,
            out_dtype=out_dtype,
            per_token=bool(per_token),
            fused=self._fused_for(k, n),
        )
        return out[:rows].reshape(*input.shape[:-1], n)

    def _fused_for(self, k: int, n: int) -> bool:
        kernel = platform.fused_kernel() if self.fused_supported else None
        return kernel is not None and kernel.supports_shape(k, n)

    def gemm_path(self, weight, weight_scale, input_scale=None, use_per_token_if_dynamic=None):
        """The scaled-GEMM function `apply` would run for these parameters (for logs and notebooks)."""
        per_token = self.use_per_token_if_dynamic if use_per_token_if_dynamic is None else use_per_token_if_dynamic
        n, k = weight.shape
        return select_gemm(self._fused_for(k, n), jax.numpy.asarray(weight_scale), input_scale, bool(per_token))
