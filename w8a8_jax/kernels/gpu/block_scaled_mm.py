"""Block-scaled fp8 GEMM for Hopper (sm90) in Pallas Mosaic GPU: DeepSeek-V3 / Qwen3-FP8's 1x128
activation groups and 128x128 weight blocks.

`block_scaled_mm` returns the block sum of `w8a8_jax.block_scaled_mm`,

  out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // 128, kb] * (qinput @ weight.T)_kb + bias[n],

on the rowwise kernel's schedule (`scaled_mm`: persistent grid, TMA producer warpgroup, two `wgmma`
consumer warpgroups, clusters multicasting the weight tile), with its narrow 128x128 CTA at every M
(on the wide one the block promotion spills: `tuned_block_sizes`). That kernel already adds each
128-wide k-block's `wgmma` sum into float32 registers, in 128-column chunks; a chunk of a warpgroup
is 64 rows of one k-block against one weight block, so the block scales apply right there: the
chunk is multiplied by its rows' activation scales times its weight block's scale as it is added
(one multiply-add an element, float32). The epilogue adds the bias and rounds once.

Where the scales come from: the activation scales travel through the operand pipeline, one
contiguous `(cta_m,)` slab of the k-block-major `(KB, M)` array per stage (`column_major_scales`
in vLLM's terms; the `(M, KB)` scales the API takes are transposed here, which XLA fuses into the
group quant that made them when both run in one program). The weight scales are scalars read from
global memory at each k-step, one per 128-column chunk (`cta_n / 128` a CTA), cached.

K that is not a multiple of 128 is zero-padded up to it (partial last blocks: zero codes add
nothing), a copy of both operands each call; M is padded to the cluster's rows. N need not be: the
TMA copies zero-fill the weight rows past N and drop the output columns past N, where N divides by
the output's store tile (`scaled_mm.out_tile_columns`: 64 columns of bf16, DeepSeek-V3's 2112
among them); other N, and the swapped decode schedule (the weight is its A operand), are padded.

The split-K and swapped decode schedules of `tuned_block_sizes` run here too (the default where
the tiles underfill the SMs, `default_config`; or `config=`): each K slice's sums carry their block
scales already, so XLA only adds the slices and the bias. Swapped, a warpgroup's 64 rows are the
weight's, within one weight block: its scale is one scalar a k-block, and the token scales come
through the pipeline as the tile's column vector.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import block_scaled_mm as block_lib
from w8a8_jax import layout, platform
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs
from w8a8_jax.kernels.gpu.tuned_block_sizes import GemmConfig

# The one block shape the kernel takes: a weight block is one promoted chunk, an activation group
# one k-step.
BLOCK = (tbs.PROMOTE_N, gpu_mm.K_MULTIPLE)


def supports(m: int, k: int, n: int, block_size, fp8_dtype) -> bool:
    """Whether the kernel takes `(M, K) x (N, K)` with `block_size`: 128x128 blocks of e4m3fn codes."""
    return tuple(block_size) == BLOCK and np.dtype(fp8_dtype) == np.dtype(jnp.float8_e4m3fn) and min(m, k, n) >= 1


def _check_config(config: GemmConfig) -> None:
    # A promoted chunk must lie in one weight block: 128 of the weight's rows (the columns of the
    # output tile, or with swapped operands the rows: one 64- or 128-row warpgroup tile).
    rows_ok = config.tile_m <= BLOCK[0] if config.swap_ab else config.tile_n % BLOCK[0] == 0
    if not config.promote or config.tile_k != BLOCK[1] or not rows_ok:
        raise ValueError(
            f"block scales apply at promotion: the config needs promote=True, tile_k={BLOCK[1]} and tile_n a "
            f"multiple of {BLOCK[0]} (swap_ab: tile_m <= {BLOCK[0]}), got {config}"
        )


def block_scaled_mm(
    qinput: jax.Array,
    weight: jax.Array,
    scale_a: jax.Array,
    scale_b: jax.Array,
    block_size,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    interpret: bool = False,
    config: GemmConfig | None = None,
) -> jax.Array:
    """The block-scaled fp8 GEMM on Hopper: the module docstring's sum, in `out_dtype`.

    Args:
      qinput: `(M, K)` float8_e4m3fn codes, quantized per token in groups of 128.
      weight: `(N, K)` float8_e4m3fn.
      scale_a: `(M, ceil(K / 128))` float32, one per token and k-block.
      scale_b: `(ceil(N / 128), ceil(K / 128))` float32, one per weight block.
      block_size: `(128, 128)`.
      bias: `(N,)` bf16/f16/f32 or None.
      out_dtype: bfloat16, float16 or float32.
      interpret: run under Mosaic GPU interpret mode (CPU tests).
      config: force a schedule (benchmarks): promoting, tile_k 128; default chosen by shape.

    Returns:
      `(M, N)` out_dtype.
    """
    scale_a, scale_b, block_size, bias, out_dtype = block_lib.check_block_gemm_operands(
        qinput, weight, scale_a, scale_b, block_size, bias, out_dtype
    )
    (m, k), n = qinput.shape, weight.shape[0]
    if not supports(max(m, 1), k, n, block_size, qinput.dtype):  # M = 0 runs no kernel (below)
        raise NotImplementedError(
            f"the Hopper block kernel takes {BLOCK} blocks of float8_e4m3fn codes, got blocks "
            f"{tuple(block_size)} of {qinput.dtype}; the XLA paths take any"
        )
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    kp, np_ = layout.round_up(k, BLOCK[1]), layout.round_up(n, BLOCK[0])
    if config is None:
        config = tbs.default_config(m, kp, np_, jnp.dtype(out_dtype).itemsize, platform.num_sms(), block_scales=True)
    else:
        config = tbs.fit_stages(config, jnp.dtype(out_dtype).itemsize, kp)
        config = tbs.fit_grid(config, layout.round_up(m, config.m_multiple), np_, platform.num_sms())
    _check_config(config)
    if np_ % config.n_multiple or kp % (BLOCK[1] * config.k_splits):
        raise ValueError(
            f"N={n} and K={k} (padded to {np_} and {kp}) must be multiples of {config.n_multiple} and "
            f"{BLOCK[1] * config.k_splits} under {config}"
        )
    return _block_gemm(qinput, weight, scale_a, scale_b, bias, config=config, out_dtype=out_dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def _block_gemm(qinput, weight, scale_a, scale_b, bias, *, config, out_dtype, interpret):
    (m, k), n = qinput.shape, weight.shape[0]
    kp, np_ = layout.round_up(k, BLOCK[1]), layout.round_up(n, BLOCK[0])
    mp = layout.round_up(m, config.m_multiple)
    # Zero codes pad K (they add nothing) and M (sliced off); the scales of padded rows are 1. N is
    # padded only where the weight is the kernel's A operand (swapped) or N is off the output's
    # store tile: otherwise TMA zero-fills the last tile's rows past N and drops its columns past
    # N, so no copy of the weight is made.
    pad_n = config.swap_ab or n % gpu_mm.out_tile_columns(config, out_dtype)
    qinput = jnp.pad(qinput, ((0, mp - m), (0, kp - k)))
    weight = jnp.pad(weight, ((0, np_ - n if pad_n else 0), (0, kp - k)))
    scale_a = jnp.pad(scale_a, ((0, mp - m), (0, 0)), constant_values=1.0)
    # k-block-major: each k-step's activation scales are one contiguous slab (a row per warpgroup).
    scale_a = scale_a.T
    if not config.swap_ab:
        scale_a = scale_a.reshape(kp // BLOCK[1], mp // config.tile_m, config.tile_m)
    if bias is not None:
        bias = jnp.pad(bias.astype(jnp.float32), (0, np_ - n))
    out = gpu_mm.gemm(
        qinput, weight, scale_a, scale_b, bias, out_dtype, config=config, block_scales=True, interpret=interpret
    )
    return out[:m, :n]
