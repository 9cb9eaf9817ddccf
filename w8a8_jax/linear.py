"""The fp8 linear ops: quantize the activation, pick a scaled-GEMM path, run it.

`Fp8LinearOp` (vLLM's Fp8LinearOp: per-tensor and per-channel weights) and `W8A8BlockFp8LinearOp`
(vLLM's W8A8BlockFp8LinearOp: DeepSeek-V3's block weights and per-token-group activations) share
the plan, the row buckets, one jitted program per plan and the gradient.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import block_scaled_mm, dispatch, dtypes, layout, platform, quantization, scaled_mm, validation
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.platform import FusedKernel
from w8a8_jax.scheme import Fp8Scheme

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
    return layout.round_up(m, step)


@functools.partial(jax.jit, static_argnames=("out_dtype", "plan"))
def _run_plan(x, weight, weight_scale, input_scale, input_scale_ub, bias, *, out_dtype, plan: dispatch.Plan):
    """`x (M, K)` float or fp8 -> `(M, N)` out_dtype, running what `plan` names; one program per
    shape and plan (the plan is part of the cache key, so a new plan compiles anew)."""
    if plan.block_size is not None:
        return block_scaled_mm.run_block_plan(plan, x, weight, weight_scale, input_scale, bias, out_dtype)
    if plan.gemm == dispatch.KERNEL_QUANT_SCALED_MM:
        return plan.kernel.quant_scaled_mm(
            x, weight, weight_scale, input_scale=input_scale, scale_ub=input_scale_ub, bias=bias, out_dtype=out_dtype
        )
    if plan.quantizer is None:
        qinput, x_scale = x, input_scale
    else:
        qinput, x_scale = quantization.run_quantizer(
            plan.quantizer, plan.kernel, x, input_scale, input_scale_ub, weight.dtype
        )
    return scaled_mm.run_gemm(plan.gemm, plan.kernel, qinput, weight, x_scale, weight_scale, bias, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _linear_2d(x, weight, weight_scale, input_scale, input_scale_ub, bias, out_dtype, plan: dispatch.Plan):
    """`_run_plan`, differentiable by the straight-through estimate (see `_linear_2d_backward`)."""
    return _run_plan(x, weight, weight_scale, input_scale, input_scale_ub, bias, out_dtype=out_dtype, plan=plan)


def _linear_2d_forward(x, weight, weight_scale, input_scale, input_scale_ub, bias, out_dtype, plan):
    out = _linear_2d(x, weight, weight_scale, input_scale, input_scale_ub, bias, out_dtype, plan)
    return out, (x, weight, weight_scale, input_scale, input_scale_ub, bias)


def _linear_2d_backward(out_dtype, plan, residuals, cotangent):
    """The input's cotangent is `g @ dequant(weight)` in float32 (the straight-through estimate:
    quantizing the input counts as the identity), cast to the input's dtype (zero for fp8 input);
    the bias gets `sum_m g`. The fp8 weight and every scale are constants: zero cotangents."""
    x, weight, weight_scale, input_scale, input_scale_ub, bias = residuals
    g = cotangent.astype(jnp.float32)
    if dtypes.is_fp8(x.dtype):
        dx = jnp.zeros_like(x)
    else:
        dequantized = quantization.dequantize_weight(weight, weight_scale, plan.block_size)  # (N, K)
        dx = jnp.dot(g, dequantized, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    dbias = None if bias is None else jnp.sum(g, axis=0).astype(bias.dtype)
    zeros = jax.tree.map(jnp.zeros_like, (weight, weight_scale, input_scale, input_scale_ub))
    return (dx, *zeros, dbias)


_linear_2d.defvjp(_linear_2d_forward, _linear_2d_backward)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's checked arguments and what the plan needs of them."""

    weight_scale: jax.Array
    input_scale: jax.Array | None  # (1,), or for fp8 input of a block scheme (M, KB): one per row
    input_scale_ub: jax.Array | None
    out_dtype: np.dtype
    scheme: Fp8Scheme
    rows: int  # M of the input
    gemm_rows: int  # M the GEMM sees (the bucket, where rows are padded)
    input_scale_per_row: bool = False


def _gemm_rows(input, rows: int, pad_output: bool) -> int:
    """The rows the GEMM runs: the bucket of eagerly called inputs (`bucket_rows`), else `rows`."""
    return bucket_rows(rows) if pad_output and not isinstance(input, jax.core.Tracer) else rows


def _apply_rows(input, weight, call: _Call, plan: dispatch.Plan, bias) -> jax.Array:
    """`input (..., K)` (rows >= 1) through `plan` -> `(..., N)`: rows padded to the bucket and back."""
    k, n = weight.shape[1], weight.shape[0]
    x, input_scale = input.reshape(-1, k), call.input_scale
    pad = call.gemm_rows - call.rows
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        if call.input_scale_per_row:
            input_scale = jnp.pad(input_scale, ((0, pad), (0, 0)), constant_values=1)  # zero codes stay zero
    out = _linear_2d(x, weight, call.weight_scale, input_scale, call.input_scale_ub, bias, call.out_dtype, plan)
    return out[: call.rows].reshape(*input.shape[:-1], n)


def _plan_call(call: _Call, input, weight, kernel: FusedKernel | None) -> dispatch.Plan:
    """The plan of one checked call: its scheme, the rows the GEMM sees, the dtypes, the kernel."""
    return dispatch.plan(
        call.scheme,
        input_shape=(call.gemm_rows, weight.shape[1]),
        input_dtype=input.dtype,
        weight_shape=weight.shape,
        weight_dtype=weight.dtype,
        out_dtype=call.out_dtype,
        kernel=kernel,
    )


def _requested_kernel(request: bool | None) -> FusedKernel | None:
    """The platform's fused kernel where `request` (an op's `fused_supported`) allows it."""
    if request is False:
        return None
    kernel = platform.fused_kernel()
    if kernel is None and request:
        raise ValueError("fused_supported=True, but no fused fp8 kernel runs on this device")
    return kernel


class Fp8LinearOp:
    """An fp8 W8A8 linear layer's computation, configured once and applied to any input.

    >>> op = Fp8LinearOp(use_per_token_if_dynamic=True)
    >>> y = op.apply(x, weight, weight_scale)   # x (..., K) bf16, weight (N, K) fp8 -> y (..., N) bf16
    >>> op.plan(x, weight, weight_scale)        # which quantizer and GEMM run, and why

    Args:
      fused_supported: allow the fused Pallas kernel (True requires one); None detects it on each
        call (`platform.fused_kernel`), so a kernel registered later is used from the next call.
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
        if fused_supported and not platform.fused_fp8_supported():
            raise ValueError("fused_supported=True, but no fused fp8 kernel runs on this device")
        self._fused_request = fused_supported
        self.use_per_token_if_dynamic = use_per_token_if_dynamic
        self.pad_output = True if pad_output is None else pad_output

    @property
    def fused_supported(self) -> bool:
        """Whether the fused kernel may run now (requested and registered for the device)."""
        return self._kernel() is not None

    def _kernel(self) -> FusedKernel | None:
        return _requested_kernel(self._fused_request)

    def _check(self, input, weight, weight_scale, out_dtype, input_scale, input_scale_ub, bias, per_token) -> _Call:
        """Checks one call's arguments at trace time; every error names the argument."""
        per_token = bool(self.use_per_token_if_dynamic if per_token is None else per_token)
        validation.check_fp8("weight", weight)
        n, k = weight.shape
        if n == 0 or k == 0:
            raise ValueError(f"weight must be (N, K) with N, K >= 1, got shape {tuple(weight.shape)}")
        if len(input.shape) < 1 or input.shape[-1] != k:
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
        if weight_scale.ndim == 2 and weight_scale.shape[1] > 1:
            raise ValueError(
                f"weight_scale of shape {tuple(weight_scale.shape)} holds several scales per output channel: block "
                "scales run on W8A8BlockFp8LinearOp; Fp8LinearOp takes (1,) or (N, 1)"
            )
        validation.check_row_scale("weight_scale", weight_scale, n, "output channel")
        validation.check_scale_values("weight_scale", weight_scale)
        if input_scale is not None:
            input_scale = validation.per_tensor_scale("input_scale", input_scale)
        if input_scale_ub is not None:
            if input_scale is not None or not per_token:
                raise ValueError("input_scale_ub applies only to dynamic per-token quantization")
            input_scale_ub = validation.per_tensor_scale("input_scale_ub", input_scale_ub)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        activation = "static" if input_scale is not None else "dynamic_per_token" if per_token else "dynamic_per_tensor"
        scheme = Fp8Scheme("per_tensor" if validation.is_per_tensor(weight_scale) else "per_channel", activation)
        rows = math.prod(input.shape[:-1])
        return _Call(
            weight_scale, input_scale, input_scale_ub, out_dtype, scheme, rows, _gemm_rows(input, rows, self.pad_output)
        )

    def _plan(self, call: _Call, input, weight) -> dispatch.Plan:
        return _plan_call(call, input, weight, self._kernel())

    def plan(
        self,
        input,
        weight: jax.Array,
        weight_scale: jax.Array,
        input_scale: jax.Array | None = None,
        input_scale_ub: jax.Array | None = None,
        bias: jax.Array | None = None,
        *,
        out_dtype=None,
        use_per_token_if_dynamic: bool | None = None,
    ) -> dispatch.Plan:
        """The `dispatch.Plan` `apply` would run for these arguments: `plan.quantizer` and
        `plan.gemm` name the functions, `plan.reason` says why. `input` may be a
        `jax.ShapeDtypeStruct` (only its shape and dtype are read)."""
        call = self._check(
            input, weight, weight_scale, out_dtype, input_scale, input_scale_ub, bias, use_per_token_if_dynamic
        )
        return self._plan(call, input, weight)

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

        Differentiable: `jax.grad` gives the input the straight-through estimate
        `g @ dequant(weight)` (float32, cast to the input's dtype) and the bias `sum_m g`; the fp8
        weight and the scales are constants (zero cotangents).
        """
        call = self._check(
            input, weight, weight_scale, out_dtype, input_scale, input_scale_ub, bias, use_per_token_if_dynamic
        )
        if call.rows == 0:
            return jnp.zeros((*input.shape[:-1], weight.shape[0]), call.out_dtype)
        plan = self._plan(call, input, weight)
        return _apply_rows(input, weight, call, plan, bias)

    def gemm_path(self, weight, weight_scale, input_scale=None, use_per_token_if_dynamic=None, *, input=None):
        """The scaled-GEMM function `apply` would run for these parameters (for logs and notebooks).

        Where a fused kernel takes the shape, whether it runs depends on M (its measured rule):
        then `input` (an array or `jax.ShapeDtypeStruct`, `(..., K)`) is required.
        """
        n, k = weight.shape
        probe = input if input is not None else jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
        plan = self.plan(probe, weight, weight_scale, input_scale, use_per_token_if_dynamic=use_per_token_if_dynamic)
        if input is None and plan.depends_on_rows:
            raise ValueError("the fused kernel takes this shape and whether it runs depends on M: pass input=")
        if plan.gemm == dispatch.KERNEL_QUANT_SCALED_MM:
            return scaled_mm.fused_w8a8_scaled_mm
        return getattr(scaled_mm, plan.gemm)


class W8A8BlockFp8LinearOp:
    """A block-scaled fp8 linear layer's computation (vLLM's W8A8BlockFp8LinearOp: DeepSeek-V3,
    Qwen3-FP8): activations quantized per token in groups of bk, weights scaled per (bn, bk) block.

    >>> op = W8A8BlockFp8LinearOp()                 # 128x128 weight blocks, 1x128 activation groups
    >>> y = op.apply(x, weight, weight_scale)       # x (..., K) bf16, weight (N, K) fp8,
    ...                                             # weight_scale (ceil(N/128), ceil(K/128)) -> (..., N)

    Args:
      weight_group_shape: `(bn, bk)`, the weight block (default (128, 128)).
      act_quant_group_shape: `(1, bk)`, one scale per token and group of bk along K; bk must be the
        weight block's.
      fused_supported: allow the platform's block kernel (True requires a fused kernel); None
        detects it on each call.
      pad_output: pad eagerly called inputs' rows to a bucket, as `Fp8LinearOp` (None means True).
    """

    def __init__(
        self,
        weight_group_shape=scheme_lib.DEFAULT_BLOCK_SIZE,
        act_quant_group_shape=(1, scheme_lib.DEFAULT_BLOCK_SIZE[1]),
        fused_supported: bool | None = None,
        pad_output: bool | None = None,
    ):
        self.block_size = scheme_lib.check_block_size(weight_group_shape)
        act = tuple(act_quant_group_shape) if isinstance(act_quant_group_shape, list | tuple) else None
        if act != (1, self.block_size[1]):
            raise ValueError(
                f"act_quant_group_shape must be (1, {self.block_size[1]}): one scale per token and group of the "
                f"weight block's bk={self.block_size[1]}, got {act_quant_group_shape!r}"
            )
        if fused_supported and getattr(platform.fused_kernel(), "block_scaled_mm", None) is None:
            raise ValueError("fused_supported=True, but no block-scaled fp8 kernel runs on this device")
        self._fused_request = fused_supported
        self.pad_output = True if pad_output is None else pad_output
        self.scheme = Fp8Scheme("block", block_size=self.block_size, fused=fused_supported)

    def _check(self, input, weight, weight_scale, input_scale, bias, out_dtype) -> _Call:
        """Checks one call's arguments at trace time; every error names the argument."""
        validation.check_fp8("weight", weight)
        n, k = weight.shape
        if n == 0 or k == 0:
            raise ValueError(f"weight must be (N, K) with N, K >= 1, got shape {tuple(weight.shape)}")
        if len(input.shape) < 1 or input.shape[-1] != k:
            raise ValueError(f"input must be (..., K) with K={k} (weight's last dim), got shape {tuple(input.shape)}")
        weight_scale = validation.as_scale("weight_scale", weight_scale)
        validation.check_block_scale("weight_scale", weight_scale, n, k, self.block_size, "weight")
        validation.check_scale_values("weight_scale", weight_scale)
        lead, groups = tuple(input.shape[:-1]), layout.num_blocks(k, self.block_size[1])
        rows = math.prod(lead)
        if dtypes.is_fp8(input.dtype):
            if input.dtype != weight.dtype:
                raise TypeError(f"fp8 input must have weight's dtype {weight.dtype}, got {input.dtype}")
            if input_scale is None:
                raise ValueError(f"fp8 input needs its input_scale, {(*lead, groups)}: one per token and group")
            input_scale = validation.as_scale("input_scale", input_scale)
            if tuple(input_scale.shape) != (*lead, groups):
                raise ValueError(
                    f"input_scale must be {(*lead, groups)}, one per token and group of {self.block_size[1]}, "
                    f"got shape {tuple(input_scale.shape)}"
                )
            validation.check_scale_values("input_scale", input_scale)
            input_scale = input_scale.reshape(rows, groups)
        else:
            validation.check_float_input("input", input)
            if input_scale is not None:
                raise ValueError("input_scale goes with fp8 input only: float input is quantized per token group")
        if out_dtype is None:
            out_dtype = input.dtype if not dtypes.is_fp8(input.dtype) else np.dtype("bfloat16")
        out_dtype = validation.check_out_dtype(out_dtype)
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            validation.check_float_input("bias", bias)
        return _Call(
            weight_scale,
            input_scale,
            None,
            out_dtype,
            self.scheme,
            rows,
            _gemm_rows(input, rows, self.pad_output),
            input_scale_per_row=input_scale is not None,
        )

    def _plan(self, call: _Call, input, weight) -> dispatch.Plan:
        return _plan_call(call, input, weight, _requested_kernel(self._fused_request))

    def plan(self, input, weight, weight_scale, input_scale=None, bias=None, out_dtype=None) -> dispatch.Plan:
        """The `dispatch.Plan` `apply` would run (`input` may be a `jax.ShapeDtypeStruct`)."""
        return self._plan(self._check(input, weight, weight_scale, input_scale, bias, out_dtype), input, weight)

    def apply(
        self,
        input: jax.Array,
        weight: jax.Array,
        weight_scale: jax.Array,
        input_scale: jax.Array | None = None,
        bias: jax.Array | None = None,
        out_dtype=None,
    ) -> jax.Array:
        """`input (..., K)` -> `(..., N)`: `block_scaled_mm`'s sum over k-blocks, plus bias.

        Args:
          input: `(..., K)` bf16/f16/f32, quantized by `per_token_group_quant_fp8`; or fp8 codes
            already quantized so, with their `input_scale`.
          weight: `(N, K)` fp8.
          weight_scale: `(ceil(N / bn), ceil(K / bk))` float32 (a checkpoint's `weight_scale_inv`).
          input_scale: `(..., ceil(K / bk))` float32 group scales of fp8 input; None for float input.
          bias: `(N,)` or None.
          out_dtype: bf16, f16 or f32; default the input's dtype (bf16 for fp8 input).

        Works under `jax.jit`; differentiable as `Fp8LinearOp.apply` (straight-through).
        """
        call = self._check(input, weight, weight_scale, input_scale, bias, out_dtype)
        if call.rows == 0:
            return jnp.zeros((*input.shape[:-1], weight.shape[0]), call.out_dtype)
        return _apply_rows(input, weight, call, self._plan(call, input, weight), bias)
