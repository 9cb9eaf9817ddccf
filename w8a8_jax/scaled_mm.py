"""The scaled fp8 GEMM paths and vLLM's decision tree that picks one.

Every path computes `out = (scale_a * scale_b) * (qinput @ weight.T) + bias` in float32 and rounds
once to `out_dtype`, with the same signature:

  fn(qinput,   # (M, K) fp8
     weight,   # (N, K) fp8, the checkpoint layout; contracted on K of both operands
     scale_a,  # (1,) per-tensor or (M, 1) per-token, float32
     scale_b,  # (1,) per-tensor or (N, 1) per-channel, float32
     bias,     # (N,) or None
     out_dtype) -> (M, N) out_dtype
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from w8a8_jax import dtypes, layout, platform, validation
from w8a8_jax.platform import FusedKernel


def apply_scales(acc, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """The epilogue: `acc (M, N)` float32 -> `scale_a * scale_b * acc + bias`, rounded once."""
    if validation.is_per_tensor(scale_a) and validation.is_per_tensor(scale_b):
        out = acc * (scale_a.reshape(()) * scale_b.reshape(()))
    else:
        out = acc * scale_a.reshape(-1, 1) * scale_b.reshape(1, -1)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(out_dtype)


def upcast_codes(qinput, weight) -> tuple[jax.Array, jax.Array]:
    """Both fp8 code arrays as float32 (exact), behind an optimization barrier: in a program that
    also quantizes, XLA:GPU would otherwise fold `f32 -> fp8 -> f32` into nothing (its
    excess-precision conversion pass) and multiply the unquantized activations."""
    qinput, weight = jax.lax.optimization_barrier((qinput, weight))
    return qinput.astype(jnp.float32), weight.astype(jnp.float32)


def fp8_dot_is_cublas(dtype) -> bool:
    """Whether fp8 `dot_general`s of `dtype` run cuBLASLt's fp8 GEMM by name (CUDA, e4m3fn).

    At default precision XLA:GPU runs cuBLASLt's fp8 GEMM with fast accumulation, in the tensor
    cores' reduced-precision accumulator; `fp8_dot_general` names the float32 algorithm instead.
    XLA:GPU rejects that algorithm for a matrix-vector product (M or N of 1) and for e4m3fnuz
    codes: the former is written as float32 products summed in float32 by the callers (one fused
    reduction reading each code once, up to 2.8x faster than XLA's default there on an H100), the
    latter keeps XLA's default, which upcasts them. CPU takes no algorithm and accumulates in
    float32 anyway; ROCm keeps XLA's default (not measured there).
    """
    return jax.default_backend() == "gpu" and not platform.is_rocm() and dtype == dtypes.FP8_E4M3FN


def fp8_dot_general(lhs, rhs, dimension_numbers) -> jax.Array:
    """An fp8 `dot_general` with float32 output, accumulated in float32 (see `fp8_dot_is_cublas`)."""
    if not fp8_dot_is_cublas(lhs.dtype):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32,
        preferred_element_type=jnp.float32,
    )


def _fp8_dot(qinput, weight) -> jax.Array:
    """`(M, K) x (N, K)` fp8 -> `(M, N)` float32, accumulated in float32."""
    if 1 in (qinput.shape[0], weight.shape[0]) and fp8_dot_is_cublas(qinput.dtype):
        a, b = upcast_codes(qinput, weight)
        return jnp.sum(a[:, None, :] * b[None, :, :], axis=-1)
    return fp8_dot_general(qinput, weight, layout.CONTRACT_K)


def xla_per_tensor_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """Per-tensor scales only: fp8 `dot_general` (cuBLASLt fp8 on Hopper), scalar scale, bias."""
    scale_a, scale_b, bias, out_dtype = validation.check_gemm_operands(
        qinput, weight, scale_a, scale_b, bias, out_dtype
    )
    if not (validation.is_per_tensor(scale_a) and validation.is_per_tensor(scale_b)):
        raise ValueError(
            "xla_per_tensor_w8a8_scaled_mm takes per-tensor scales only, got "
            f"scale_a {tuple(scale_a.shape)} and scale_b {tuple(scale_b.shape)}"
        )
    return apply_scales(_fp8_dot(qinput, weight), scale_a, scale_b, bias, out_dtype)


def xla_per_token_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """Rowwise: fp8 `dot_general` to float32, then `(M, 1) x (1, N)` scales and bias in one fusion."""
    scale_a, scale_b, bias, out_dtype = validation.check_gemm_operands(
        qinput, weight, scale_a, scale_b, bias, out_dtype
    )
    return apply_scales(_fp8_dot(qinput, weight), scale_a, scale_b, bias, out_dtype)


def xla_channelwise_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """The portable fallback: a float32 GEMM on the upcast codes, then scales, then bias.

    Exact at default precision: fp8 codes (4 significant bits) are representable in the bf16/tf32
    inputs of reduced-precision f32 matmuls, and their products in float32. The codes are upcast
    behind an optimization barrier (`upcast_codes`).
    """
    scale_a, scale_b, bias, out_dtype = validation.check_gemm_operands(
        qinput, weight, scale_a, scale_b, bias, out_dtype
    )
    acc = jax.lax.dot_general(*upcast_codes(qinput, weight), layout.CONTRACT_K, preferred_element_type=jnp.float32)
    return apply_scales(acc, scale_a, scale_b, bias, out_dtype)


def fused_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """The platform's fused Pallas GEMM (scales and bias in its epilogue); see `platform`.

    Called directly it runs the kernel wherever the kernel takes the shape; `Fp8LinearOp`'s plan
    also weighs the kernel's measured rule (`dispatch.plan`).
    """
    kernel = platform.fused_kernel()
    if kernel is None:
        device = jax.devices()[0]
        raise NotImplementedError(
            f"no fused fp8 kernel runs on {device.platform} device {device.device_kind!r}; "
            "fused_fp8_supported() is False there: use an xla_* path or dispatch_w8a8_scaled_mm(False, ...)"
        )
    k, n = qinput.shape[1], weight.shape[0]
    if not kernel.supports_shape(k, n):
        raise ValueError(f"the fused fp8 kernel does not take K={k}, N={n}; use an xla_* path")
    return run_kernel_gemm(kernel, qinput, weight, scale_a, scale_b, bias, out_dtype)


def run_kernel_gemm(kernel: FusedKernel, qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """`kernel.scaled_mm` on validated operands."""
    scale_a, scale_b, bias, out_dtype = validation.check_gemm_operands(
        qinput, weight, scale_a, scale_b, bias, out_dtype
    )
    return kernel.scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype)


def dispatch_w8a8_scaled_mm(
    fused_supported: bool,
    per_tensor_weights: bool,
    per_tensor_activations: bool,
    use_per_token_if_dynamic: bool | None,
) -> Callable[..., jax.Array]:
    """vLLM's decision tree: fused kernel, else per-tensor, else rowwise, else channelwise.

    CUTLASS becomes our fused Pallas kernel and `torch._scaled_mm` becomes XLA, on which rowwise
    scaling is always available (vLLM's `USE_ROWWISE_TORCH_SCALED_MM`).
    """
    if fused_supported:
        return fused_w8a8_scaled_mm
    if per_tensor_weights and per_tensor_activations:
        return xla_per_tensor_w8a8_scaled_mm
    if use_per_token_if_dynamic and not per_tensor_weights and not per_tensor_activations:
        return xla_per_token_w8a8_scaled_mm
    return xla_channelwise_w8a8_scaled_mm


_XLA_PATHS = {
    path.__name__: path
    for path in (xla_per_tensor_w8a8_scaled_mm, xla_per_token_w8a8_scaled_mm, xla_channelwise_w8a8_scaled_mm)
}


def run_gemm(name: str, kernel: FusedKernel | None, qinput, weight, scale_a, scale_b, bias, out_dtype) -> jax.Array:
    """Runs the GEMM path a `dispatch.Plan` names, the fused one on the plan's `kernel`."""
    if name == fused_w8a8_scaled_mm.__name__:
        return run_kernel_gemm(kernel, qinput, weight, scale_a, scale_b, bias, out_dtype)
    return _XLA_PATHS[name](qinput, weight, scale_a, scale_b, bias, out_dtype)
