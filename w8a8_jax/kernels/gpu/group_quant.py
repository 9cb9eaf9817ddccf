"""Dynamic per-token-group fp8 quantization for Hopper in Pallas Mosaic GPU: the activations of
block-scaled layers, one scale per token and group of 128 along K.

`per_token_group_quant(x (M, K), 128, fp8_dtype)` returns codes `(M, K)` float8_e4m3fn and scales
`(M, K / 128)` float32, identical to `quantization.quantize_per_token_group` on the same input:
    s = max(amax(|group|), eps) / 448,   q = e4m3(clamp(x / s, -448, 448)),
the amax over the group's finite values. The kernel writes the scales k-block-major, `(K / 128,
M)`, the layout the block GEMM (`block_scaled_mm`) reads, and returns their transpose: where both
run in one program the two transposes cancel, leaving at most a copy of the small `(K / 128, M)`
array where the GEMM pads M to its cluster's rows.

Schedule: one warpgroup per 64 x 128 tile (64 tokens, one group), loaded straight from global
memory in the 8-bit `wgmma` layout (vectors of 4 consecutive elements; each row's 16-column pieces
in one quad of lanes: 32 bytes a piece for bf16). The group's amax is a reduction within the thread
and the quad (no shared memory); the division is the per-token kernel's exact
`f32(f64(x) * (1 / f64(s)))` (`quant.py` says why it is exact). The codes go through a
shared-memory tile and one TMA store: stored from registers, a row piece would be 16 bytes, half a
32-byte sector. The tile is unswizzled (Mosaic GPU's layout inference finds no register layout for
a swizzled one here), at the price of bank conflicts on the shared-memory side. The 64 scales are
stored from registers. M not a multiple of 64: the last row block is moved back to end at row M
and overlaps the one before it, whose rows it writes again with the same values (M < 64 pads to
64 rows).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from w8a8_jax import dtypes, layout, quantization, validation

GROUP = 128
ROWS = 64  # rows of one warpgroup's tile: the `wgmma` layout's


def supports(k: int, group_size: int, x_dtype, fp8_dtype) -> bool:
    """Whether the kernel quantizes rows of length `k` in groups of `group_size` to `fp8_dtype`."""
    return (
        group_size == GROUP
        and k > 0
        and k % GROUP == 0
        and np.dtype(x_dtype) in dtypes.FLOAT_DTYPES
        and np.dtype(fp8_dtype) == np.dtype(jnp.float8_e4m3fn)
    )


def _group_quant_kernel(x_gmem, q_gmem, s_gmem):
    m = x_gmem.shape[0]
    bound = float(dtypes.fp8_max(jnp.float8_e4m3fn))
    row0 = jnp.minimum(lax.axis_index("rows") * ROWS, m - ROWS)
    group = lax.axis_index("groups")
    rows, cols = pl.ds(row0, ROWS), pl.ds(group * GROUP, GROUP)
    x = plgpu.load(x_gmem.at[rows, cols], layout=plgpu.Layout.WGMMA_8BIT, optimized=False).astype(jnp.float32)
    magnitude = jnp.abs(x)
    amax = jnp.max(jnp.where(magnitude < jnp.inf, magnitude, 0.0), axis=1)  # NaN and ±Inf count as 0
    scale = quantization.true_divide(
        jnp.maximum(amax, jnp.float32(quantization.GROUP_EPS)), jnp.float32(bound), in_kernel=True
    )
    with jax.enable_x64(True):
        inverse = lax.broadcast_in_dim(1.0 / scale.astype(jnp.float64), x.shape, [0])
        quotient = (x.astype(jnp.float64) * inverse).astype(jnp.float32)
    codes = jnp.clip(quotient, -bound, bound).astype(jnp.float8_e4m3fn)
    s_gmem[group, rows] = scale

    @functools.partial(pl.run_scoped, q_smem=plgpu.SMEM((ROWS, GROUP), jnp.float8_e4m3fn))
    def _store(q_smem):
        q_smem[...] = codes
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, q_gmem.at[rows, cols])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _group_quant(x, *, interpret: bool):
    m, k = x.shape
    mp = max(m, ROWS)
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    kernel = plgpu.kernel(
        _group_quant_kernel,
        out_type=(
            jax.ShapeDtypeStruct((mp, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((k // GROUP, mp), jnp.float32),
        ),
        grid=(layout.num_blocks(mp, ROWS), k // GROUP),
        grid_names=("rows", "groups"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    with jax.named_scope("fp8_per_token_group_quant"):
        q, scale_t = kernel(x)
    return q[:m], scale_t[:, :m].T


def per_token_group_quant(
    x: jax.Array, group_size: int, fp8_dtype, *, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token-group quantization, fused: codes `(M, K)` e4m3fn and scales `(M, K / 128)`.

    Args:
      x: `(M, K)` bfloat16, float16 or float32; K a multiple of 128.
      group_size: 128.
      fp8_dtype: float8_e4m3fn (Hopper's format).
      interpret: run under Mosaic GPU interpret mode (CPU tests).
    """
    validation.check_float_input("x", x, ndim=2)
    validation.check_group_size("group_size", group_size)
    m, k = x.shape
    if np.dtype(fp8_dtype) != np.dtype(jnp.float8_e4m3fn):
        raise NotImplementedError(f"the group quant kernel writes float8_e4m3fn codes, got {np.dtype(fp8_dtype).name}")
    if not supports(k, group_size, x.dtype, fp8_dtype):
        raise ValueError(
            f"the group quant kernel takes groups of {GROUP} of rows whose K is a multiple of {GROUP}, "
            f"got group_size={group_size}, K={k}"
        )
    if m == 0:
        return jnp.zeros((0, k), jnp.float8_e4m3fn), jnp.zeros((0, k // GROUP), jnp.float32)
    return _group_quant(x, interpret=interpret)
