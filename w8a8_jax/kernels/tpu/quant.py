"""Pallas TPU kernel: dynamic per-token fp8 quantization, one pass over blocks of whole rows.

Each program reads `tile_m` rows of `x (M, K)`, and writes their fp8 codes and `(tile_m, 1)`
scales with exactly the formula of `w8a8_jax.quantization.quantize_per_token` (the kernel body
calls it): `s_m = max(min(amax_m, scale_ub) / max, 1 / (max * 512))`, `q = fp8(clamp(x / s_m))`.
The floor on `s_m` keeps zero rows (and the zero rows added as padding) finite: codes 0, scale
`1 / (max * 512)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from w8a8_jax import dtypes, layout, quantization, validation
from w8a8_jax.kernels.tpu import hardware, tuned_block_sizes

# Most rows per program: enough to amortize the per-step overhead; the rows are memory-bound.
_MAX_TILE_M = 256


def _per_token_quant_kernel(*refs, has_ub: bool, fp8_dtype):
    if has_ub:
        scale_ub_smem, x_vmem, q_vmem, scale_vmem = refs  # (1,) f32; (tm, K); (tm, K) fp8; (tm, 1) f32
        scale_ub = scale_ub_smem[0]
    else:
        x_vmem, q_vmem, scale_vmem = refs
        scale_ub = None
    q, scale = quantization.quantize_per_token(x_vmem[...], scale_ub, fp8_dtype)
    q_vmem[...] = q
    scale_vmem[...] = scale


def quant_tile_m(gen: hardware.Generation, m: int, k: int, x_dtype) -> int:
    """Rows per program: the most (a multiple of 32, at most 256 and M rounded up) within the VMEM
    budget; raises ValueError if even 32 rows of length K do not fit."""
    tile_m = min(_MAX_TILE_M, layout.round_up(m, tuned_block_sizes.SUBLANES_8BIT))
    while tile_m > tuned_block_sizes.SUBLANES_8BIT and tuned_block_sizes.quant_vmem_bytes(
        tile_m, k, x_dtype
    ) > tuned_block_sizes.vmem_budget(gen):
        tile_m -= tuned_block_sizes.SUBLANES_8BIT
    tuned_block_sizes.check_vmem(
        tuned_block_sizes.quant_vmem_bytes(tile_m, k, x_dtype), gen, f"per-token quant of rows of K={k}"
    )
    return tile_m


@functools.partial(jax.jit, static_argnames=("fp8_dtype", "tile_m", "vmem_limit", "interpret"))
def _per_token_quant(x, scale_ub, *, fp8_dtype, tile_m, vmem_limit, interpret):
    m, k = x.shape
    m_pad = layout.round_up(m, tile_m)
    x = jnp.pad(x, ((0, m_pad - m), (0, 0)))  # zero rows quantize to zero codes, finite scales
    in_specs = [pl.BlockSpec((tile_m, k), lambda i: (i, 0))]
    operands = [x]
    if scale_ub is not None:
        in_specs.insert(0, pl.BlockSpec(memory_space=pltpu.SMEM))
        operands.insert(0, scale_ub)
    with jax.named_scope(f"w8a8_per_token_quant_tm{tile_m}"):
        q, scale = pl.pallas_call(
            functools.partial(_per_token_quant_kernel, has_ub=scale_ub is not None, fp8_dtype=fp8_dtype),
            grid=(m_pad // tile_m,),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((tile_m, k), lambda i: (i, 0)), pl.BlockSpec((tile_m, 1), lambda i: (i, 0))],
            out_shape=[jax.ShapeDtypeStruct((m_pad, k), fp8_dtype), jax.ShapeDtypeStruct((m_pad, 1), jnp.float32)],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit),
            interpret=interpret,
        )(*operands)
    return q[:m], scale[:m]


def per_token_quant(
    x: jax.Array,
    scale_ub: jax.Array | None,
    fp8_dtype,
    *,
    generation: str | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token quantization of `x (M, K)` (bf16/f16/f32) on TPU.

    Returns `(q (M, K) fp8_dtype, scale (M, 1) float32)`, bit-identical to
    `quantization.quantize_per_token(x, scale_ub, fp8_dtype)`.

    Args:
      x: `(M, K)` bfloat16, float16 or float32.
      scale_ub: None or `(1,)` float32 upper bound on each row's amax.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz.
      generation: TPU generation whose VMEM budget applies ("v4", "v5e", "v5p", "v6e", "v7");
        None: the default device's (`hardware.INTERPRET_GENERATION` off TPU).
      interpret: `pltpu.InterpretParams()` to run in TPU interpret mode (e.g. on CPU).
    """
    validation.check_float_input("x", x, ndim=2)
    if not dtypes.is_fp8(fp8_dtype):
        raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    if scale_ub is not None:
        scale_ub = validation.per_tensor_scale("scale_ub", scale_ub)
    gen = hardware.resolve(generation)
    m, k = x.shape
    tile_m = quant_tile_m(gen, m, k, x.dtype)
    limit = tuned_block_sizes.vmem_limit(tuned_block_sizes.quant_vmem_bytes(tile_m, k, x.dtype), gen)
    return _per_token_quant(
        x, scale_ub, fp8_dtype=np.dtype(fp8_dtype), tile_m=tile_m, vmem_limit=limit, interpret=interpret
    )
