"""The Hopper GEMMs with overlapped promotion (`GemmConfig.overlap_promotion`: each k-block's `wgmma`
into one of two accumulators while the previous one is promoted) against the float64 references:
interpret mode on CPU (rowwise and block scales, the large-M and the swapped decode schedules), the
config rules, the lowering for CUDA at real shapes, and real shapes on a Hopper GPU.
"""

import dataclasses

import jax.numpy as jnp
import pytest

from tests import reference
from tests.kernels.gpu.test_block_scaled_mm import check as check_block
from tests.kernels.gpu.test_lowering import gemm_lowers
from tests.kernels.gpu.test_scaled_mm import check as check_rowwise
from tests.kernels.gpu.test_scaled_mm import on_hopper
from w8a8_jax import platform
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

BLOCK = (128, 128)
OVERLAPPED = dataclasses.replace(tbs.NARROW_GEMM, overlap_promotion=True)
OVERLAPPED_DECODE = dataclasses.replace(tbs.DECODE_GEMM, tile_n=32, k_splits=3, stages=3, overlap_promotion=True)


# Interpret mode (2 SMs): K of 3 to 6 k-blocks, so both accumulators take turns and the last
# k-block is promoted after the loop; odd M, bias or not, every out dtype.
@pytest.mark.parametrize(
    "m, k, granularity, with_bias, out_dtype",
    [(130, 384, "rowwise", True, jnp.bfloat16), (7, 768, "per_tensor", False, jnp.float32)],
)
def test_rowwise_interpret(key, m, k, granularity, with_bias, out_dtype):
    check_rowwise(key, m, k, 256, granularity, with_bias, out_dtype, interpret=True, config=OVERLAPPED)


@pytest.mark.parametrize(
    "m, k, n, config, out_dtype",
    [
        (130, 640, 256, OVERLAPPED, jnp.bfloat16),
        (9, 600, 520, OVERLAPPED, jnp.float32),  # K and N off the blocks
        (20, 1152, 384, OVERLAPPED_DECODE, jnp.float32),  # swapped: the token scales along the columns
    ],
    ids=["narrow", "off_the_blocks", "swapped_decode"],
)
def test_block_interpret(key, m, k, n, config, out_dtype):
    check_block(key, m, k, n, True, out_dtype, config=config)


def test_config_rules():
    with pytest.raises(ValueError, match="overlap_promotion needs promote=True and tile_n <= 128"):
        dataclasses.replace(tbs.DEFAULT_GEMM, overlap_promotion=True)
    with pytest.raises(ValueError, match="overlap_promotion needs promote=True"):
        tbs.GemmConfig(promote=False, overlap_promotion=True)
    fitted = tbs.fit_stages(dataclasses.replace(OVERLAPPED, persistent_pipeline=True), 2, k=128 * 12)
    assert fitted.overlap_promotion and not fitted.persistent_pipeline  # no pipeline of pipelines
    single = tbs.fit_stages(dataclasses.replace(OVERLAPPED, k_splits=4), 2, k=128 * 4)
    assert not single.overlap_promotion  # one k-block a unit: nothing to overlap


@pytest.mark.parametrize(
    "m, k, n, config",
    [(4096, 8192, 8192, OVERLAPPED), (1024, 7168, 2112, OVERLAPPED), (16, 4608, 28672, OVERLAPPED_DECODE)],
    ids=["large", "n_padded", "decode"],
)
@pytest.mark.parametrize("kind", ["rowwise", "block"])
def test_lowers(m, k, n, config, kind):
    assert gemm_lowers(kind, m, k, n, config)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("m, k, n", [(4096, 7168, 2112), (1000, 18432, 512), (300, 4100, 2000)])
def test_hopper_block(key, m, k, n):
    err = check_block(key, m, k, n, True, jnp.float32, interpret=False, config=OVERLAPPED)
    assert err <= reference.TENSOR_CORE_FLOOR


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("m, k, n", [(4096, 14336, 4096), (8, 4096, 6144)])
def test_hopper_rowwise(key, m, k, n):
    config = OVERLAPPED if m > 64 else tbs.decode_config(m, k, n, 2, platform.num_sms())
    config = dataclasses.replace(config, overlap_promotion=True)
    check_rowwise(key, m, k, n, "rowwise", True, jnp.bfloat16, interpret=False, config=config)
