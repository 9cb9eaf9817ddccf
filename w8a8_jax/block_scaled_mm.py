"""Block-scaled fp8 GEMMs (DeepSeek-V3 / Qwen3-FP8): the XLA paths and the one public call.

With weight blocks `(bn, bk)` and activation groups of `bk` along K (KB = ceil(K / bk) of them,
the last one partial where K is not a multiple):

  out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // bn, kb] * sum_{k in kb} qinput[m, k] * weight[n, k]
              + bias[n]

each k-block's product in float32, scaled in float32 and summed in float32, rounded once to
`out_dtype`. Every path takes

  fn(qinput,      # (M, K) fp8
     weight,      # (N, K) fp8
     scale_a,     # (M, KB) float32, one per token and k-block
     scale_b,     # (ceil(N / bn), KB) float32, one per weight block
     block_size,  # (bn, bk)
     bias,        # (N,) or None
     out_dtype) -> (M, N) out_dtype

Two XLA formulations, the plan choosing by shape (`dispatch`): `xla_block_w8a8_scaled_mm` runs
each k-block's product as an fp8 GEMM and scales and sums the float32 partial products
(everywhere; on Hopper bound by writing and reading those partials, `(KB, M, N)` float32);
`xla_block_dequant_w8a8_scaled_mm` dequantizes both operands to float32 and runs one GEMM by
XLA's three-pass bf16 algorithm (CUDA, large M x N).
"""

import functools

import jax
import jax.numpy as jnp

from w8a8_jax import dispatch, layout, platform, quantization, scaled_mm, validation
from w8a8_jax import scheme as scheme_lib

# The most float32 per-k-block products, `(KB, rows, N)`, the XLA path holds at once; more rows run
# in row chunks of this size one after another (each chunk finishes its own rows: no accumulator
# goes back to memory). 1 GiB keeps M = 4096 on a 7168 x 24576 layer in 12 chunks.
PARTIAL_PRODUCT_BYTES = 1 << 30


def check_block_gemm_operands(qinput, weight, scale_a, scale_b, block_size, bias, out_dtype):
    """Validates a block-scaled GEMM's operands; returns `(scale_a, scale_b, block_size, bias,
    out_dtype)` normalized. Every error names the argument and the shape it expected."""
    validation.check_fp8("qinput", qinput)
    validation.check_fp8("weight", weight)
    if qinput.dtype != weight.dtype:
        raise TypeError(f"qinput and weight must share one fp8 dtype, got {qinput.dtype} and {weight.dtype}")
    (m, k), (n, weight_k) = qinput.shape, weight.shape
    if weight_k != k:
        raise ValueError(f"weight must be (N, K) with K={k} (qinput's last dim), got shape {tuple(weight.shape)}")
    if k == 0 or n == 0:
        raise ValueError(f"weight must be (N, K) with N, K >= 1, got shape {tuple(weight.shape)}")
    block_size = scheme_lib.check_block_size(block_size)
    scale_a = validation.as_scale("scale_a", scale_a)
    scale_b = validation.as_scale("scale_b", scale_b)
    validation.check_block_scale("scale_a", scale_a, m, k, (1, block_size[1]), "qinput")
    validation.check_block_scale("scale_b", scale_b, n, k, block_size, "weight")
    validation.check_scale_values("scale_a", scale_a)
    validation.check_scale_values("scale_b", scale_b)
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        validation.check_float_input("bias", bias)
    return scale_a, scale_b, block_size, bias, validation.check_out_dtype(out_dtype)


def _block_products(a, w) -> jax.Array:
    """`a (R, KB, bk)`, `w (N, KB, bk)` fp8 -> each k-block's product `(KB, R, N)` float32."""
    return scaled_mm.fp8_dot_general(a, w, (((2,), (2,)), ((1,), (1,))))


def _block_rows(a, w, scale_a, column_scale, bias, out_dtype) -> jax.Array:
    """`a (R, KB, bk)` codes of R rows with `scale_a (R, KB)`; `column_scale (KB, N)`, each output
    column's weight scale per k-block -> `(R, N)` out_dtype."""
    if 1 in (a.shape[0], w.shape[0]) and scaled_mm.fp8_dot_is_cublas(a.dtype):
        # cuBLASLt takes no matrix-vector fp8 GEMM: products summed in float32, reading each code once.
        a32, w32 = scaled_mm.upcast_codes(a, w)
        if a.shape[0] == 1:
            products = jnp.sum(a32[0][None] * w32, axis=-1).T[:, None, :]  # (KB, 1, N)
        else:
            products = jnp.sum(a32 * w32[0][None], axis=-1).T[:, :, None]  # (KB, R, 1)
    else:
        products = _block_products(a, w)
    out = jnp.sum(products * (scale_a.T[:, :, None] * column_scale[:, None, :]), axis=0)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(out_dtype)


def xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, block_size, bias, out_dtype) -> jax.Array:
    """The portable block-scaled GEMM: per k-block fp8 `dot_general`s in one batched call (cuBLASLt
    fp8 on Hopper), then the scales and the sum over k-blocks in one fusion, in row chunks that hold
    at most `PARTIAL_PRODUCT_BYTES` of products."""
    scale_a, scale_b, block_size, bias, out_dtype = check_block_gemm_operands(
        qinput, weight, scale_a, scale_b, block_size, bias, out_dtype
    )
    return _xla_block(qinput, weight, scale_a, scale_b, bias, block_size=block_size, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "out_dtype"))
def _xla_block(qinput, weight, scale_a, scale_b, bias, *, block_size, out_dtype):
    (m, k), n = qinput.shape, weight.shape[0]
    bn, bk = block_size
    blocks = layout.num_blocks(k, bk)
    pad = blocks * bk - k
    if pad:  # zero codes add nothing to the last block's product
        qinput, weight = (jnp.pad(x, ((0, 0), (0, pad))) for x in (qinput, weight))
    a = qinput.reshape(m, blocks, bk)
    w = weight.reshape(n, blocks, bk)
    column_scale = jnp.repeat(scale_b, bn, axis=0)[:n].T  # (KB, N)
    rows = max(1, PARTIAL_PRODUCT_BYTES // (blocks * n * 4))
    if m <= rows:
        return _block_rows(a, w, scale_a, column_scale, bias, out_dtype)
    chunks = layout.num_blocks(m, rows)
    a = jnp.pad(a, ((0, chunks * rows - m), (0, 0), (0, 0))).reshape(chunks, rows, blocks, bk)
    scale_a = jnp.pad(scale_a, ((0, chunks * rows - m), (0, 0)), constant_values=1).reshape(chunks, rows, blocks)
    out = jax.lax.map(lambda chunk: _block_rows(chunk[0], w, chunk[1], column_scale, bias, out_dtype), (a, scale_a))
    return out.reshape(chunks * rows, n)[:m]


def xla_block_dequant_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, block_size, bias, out_dtype) -> jax.Array:
    """The block GEMM as one float32 GEMM: `dequant(qinput) @ dequant(weight).T`, each operand
    dequantized with one float32 rounding (`quantization.dequantize_weight`), multiplied by XLA's
    `BF16_BF16_F32_X3` algorithm (each operand split into a bf16 head and tail; three bf16 GEMMs,
    float32 accumulation): about 16 bits of each operand, so ~2^-16 relative per product. On the
    H200 (K = 7168, float32 out) it is within 2e-5 of float64 where the per-k-block fp8 GEMMs,
    summed by the tensor cores' fp8 accumulator, are within 1.4e-4; and up to 2.2x faster than
    them at large M x N, where their float32 partial products dominate."""
    scale_a, scale_b, block_size, bias, out_dtype = check_block_gemm_operands(
        qinput, weight, scale_a, scale_b, block_size, bias, out_dtype
    )
    return _xla_block_dequant(qinput, weight, scale_a, scale_b, bias, block_size=block_size, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "out_dtype"))
def _xla_block_dequant(qinput, weight, scale_a, scale_b, bias, *, block_size, out_dtype):
    # The codes cross a barrier before the upcast: where the same program quantized them, XLA:GPU
    # would otherwise fold the `f32 -> fp8 -> f32` chain and multiply the unquantized activations
    # (found on the H200: 2% off the fp8 reference at 1024 x 256 x 4096).
    qinput, weight = scaled_mm.upcast_codes(qinput, weight)
    a = quantization.dequantize_weight(qinput, scale_a, (1, block_size[1]))
    w = quantization.dequantize_weight(weight, scale_b, block_size)
    if 1 in (a.shape[0], w.shape[0]):
        # XLA:GPU does not run the three-pass algorithm for a matrix-vector product: float32
        # products summed in float32 instead (one fused reduction).
        out = jnp.sum(a[:, None, :] * w[None, :, :], axis=-1)
    else:
        out = jax.lax.dot_general(
            a,
            w,
            layout.CONTRACT_K,
            precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
            preferred_element_type=jnp.float32,
        )
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(out_dtype)


def run_block_plan(plan: dispatch.Plan, x, weight, weight_scale, input_scale, bias, out_dtype) -> jax.Array:
    """Runs a block `dispatch.Plan` on `x (M, K)` (float, or fp8 codes with their group
    `input_scale (M, KB)`) -> `(M, N)` out_dtype."""
    block_size = plan.block_size
    if plan.gemm == dispatch.KERNEL_QUANT_BLOCK_SCALED_MM:
        return plan.kernel.quant_block_scaled_mm(x, weight, weight_scale, block_size, bias, out_dtype)
    if plan.quantizer is None:
        qinput, x_scale = x, input_scale
    elif plan.quantizer == dispatch.KERNEL_PER_TOKEN_GROUP_QUANT:
        qinput, x_scale = plan.kernel.per_token_group_quant(x, block_size[1], weight.dtype)
    else:
        qinput, x_scale = quantization.quantize_per_token_group(x, block_size[1], weight.dtype)
    if plan.gemm == dispatch.KERNEL_BLOCK_SCALED_MM:
        return plan.kernel.block_scaled_mm(qinput, weight, x_scale, weight_scale, block_size, bias, out_dtype)
    if plan.gemm == dispatch.XLA_BLOCK_DEQUANT_GEMM:
        return _xla_block_dequant(
            qinput, weight, x_scale, weight_scale, bias, block_size=block_size, out_dtype=out_dtype
        )
    return _xla_block(qinput, weight, x_scale, weight_scale, bias, block_size=block_size, out_dtype=out_dtype)


def w8a8_block_fp8_matmul(qinput, weight, scale_a, scale_b, block_size, out_dtype=jnp.bfloat16) -> jax.Array:
    """The block-scaled fp8 GEMM (vLLM's `w8a8_block_fp8_matmul`), on the path the plan picks: the
    platform's block kernel where one takes the shape, else an XLA formulation (module docstring).

    Args:
      qinput: `(M, K)` fp8 activation codes (`per_token_group_quant_fp8` with group `bk`).
      weight: `(N, K)` fp8.
      scale_a: `(M, ceil(K / bk))` float32.
      scale_b: `(ceil(N / bn), ceil(K / bk))` float32.
      block_size: `[bn, bk]`.
      out_dtype: bf16 (default), f16 or f32.

    Returns:
      `(M, N)` out_dtype, the module docstring's sum.
    """
    scale_a, scale_b, block_size, _, out_dtype = check_block_gemm_operands(
        qinput, weight, scale_a, scale_b, block_size, None, out_dtype
    )
    plan = dispatch.plan(
        scheme_lib.Fp8Scheme("block", block_size=block_size),
        input_shape=qinput.shape,
        input_dtype=qinput.dtype,
        weight_shape=weight.shape,
        weight_dtype=weight.dtype,
        out_dtype=out_dtype,
        kernel=platform.fused_kernel(),
    )
    return run_block_plan(plan, qinput, weight, scale_b, scale_a, None, out_dtype)
