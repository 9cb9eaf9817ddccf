"""The Hopper kernels lower to Mosaic GPU for CUDA on a machine without a GPU.

Interpret mode runs the kernels' semantics, not their lowering: a layout, transform or pipeline
that Mosaic GPU rejects only shows when the kernel is lowered. Lowering for the "cuda" platform
needs no device, so CI catches those errors too (ptxas and the hardware's own rules still need a GPU).
"""

import jax
import jax.numpy as jnp
import pytest

from w8a8_jax import layout, platform
from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block
from w8a8_jax.kernels.gpu import quant
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs


def lowers_to_mosaic_gpu(fn, *args) -> bool:
    with platform.override(num_sms=132):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return "mosaic_gpu" in text


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def gemm_lowers(kind: str, m: int, k: int, n: int, config: tbs.GemmConfig) -> bool:
    """Whether the "rowwise" (`scaled_mm`, N padded to 128 first) or "block" (`block_scaled_mm`,
    128x128 blocks) GEMM of `(m, k) x (n, k)` lowers under `config`, bf16 out with a bias."""
    if kind == "rowwise":
        n = layout.round_up(n, 128)

        def fn(q, w, sa, sb, bias):
            return gpu_mm.scaled_mm(q, w, sa, sb, bias, jnp.bfloat16, config=config)

        scales = (spec((m, 1), jnp.float32), spec((n, 1), jnp.float32))
    else:

        def fn(q, w, sa, sb, bias):
            return gpu_block.block_scaled_mm(q, w, sa, sb, (128, 128), bias, jnp.bfloat16, config=config)

        kb = layout.num_blocks(k, 128)
        scales = (spec((m, kb), jnp.float32), spec((layout.num_blocks(n, 128), kb), jnp.float32))
    q, w = spec((m, k), jnp.float8_e4m3fn), spec((n, k), jnp.float8_e4m3fn)
    return lowers_to_mosaic_gpu(fn, q, w, *scales, spec((n,), jnp.bfloat16))


@pytest.mark.parametrize(
    "config",
    [
        tbs.DEFAULT_GEMM,
        tbs.GemmConfig(promote=False, tile_m=128, wg_split="n"),
        tbs.GemmConfig(cluster="n"),
        tbs.GemmConfig(persistent_pipeline=True),
        tbs.NARROW_GEMM,
    ],
    ids=str,
)
def test_gemm_lowers(config):
    m, k, n = 512, 1024, 512

    def fn(q, w, sa, sb, bias):
        return gpu_mm.scaled_mm(q, w, sa, sb, bias, jnp.bfloat16, config=config)

    args = (
        spec((m, k), jnp.float8_e4m3fn),
        spec((n, k), jnp.float8_e4m3fn),
        spec((m, 1), jnp.float32),
        spec((n, 1), jnp.float32),
        spec((n,), jnp.bfloat16),
    )
    assert lowers_to_mosaic_gpu(fn, *args)


@pytest.mark.parametrize("x_dtype, k, with_ub", [(jnp.bfloat16, 4096, False), (jnp.float32, 12288, True)])
def test_quant_lowers(x_dtype, k, with_ub):
    def fn(x, ub):
        return quant.per_token_quant(x, ub, jnp.float8_e4m3fn, rows_per_block=2)

    assert lowers_to_mosaic_gpu(fn, spec((33, k), x_dtype), spec((1,), jnp.float32) if with_ub else None)
