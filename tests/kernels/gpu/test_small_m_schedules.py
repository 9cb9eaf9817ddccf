"""The Hopper GEMMs' schedules for shapes whose output tiles underfill the SMs: K split into slices
(`GemmConfig.k_splits`) and, for decode-sized M, the operands swapped (`GemmConfig.swap_ab`), for
both the rowwise and the block-scaled kernel, against the float64 references: interpret mode on
CPU, the lowering for CUDA at real shapes, the model that picks the split, and real shapes on a
Hopper GPU.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.kernels.gpu.test_block_scaled_mm import check as check_block
from tests.kernels.gpu.test_block_scaled_mm import operands as block_operands
from tests.kernels.gpu.test_block_scaled_mm import relative_error
from tests.kernels.gpu.test_lowering import gemm_lowers
from tests.kernels.gpu.test_scaled_mm import check as check_rowwise
from tests.kernels.gpu.test_scaled_mm import on_hopper
from w8a8_jax import layout, platform
from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

BLOCK = (128, 128)
SPLIT = dataclasses.replace(tbs.NARROW_GEMM, k_splits=2)
SPLIT_WIDE = dataclasses.replace(tbs.DEFAULT_GEMM, k_splits=3, epi_tile_n=16)
SWAPPED = dataclasses.replace(tbs.DECODE_GEMM, tile_n=16)
SWAPPED_SPLIT = dataclasses.replace(tbs.DECODE_GEMM, tile_n=32, k_splits=3)
IDS = ["split", "split_wide", "swapped", "swapped_split"]


def _shape(config, m):
    """A small GEMM each schedule runs in interpret mode: K of 3 x 2 k-blocks, M within the
    swapped schedule's token tile."""
    return (min(m, config.tile_n) if config.swap_ab else m), 768, 512


# Interpret mode (2 SMs, so a CTA runs several work units): each schedule at two M (odd, and
# decode-sized or past a CTA row), bias or not, every out dtype and both scale granularities.
@pytest.mark.parametrize(
    "config, m, granularity, with_bias, out_dtype",
    [
        (SPLIT, 5, "rowwise", True, jnp.bfloat16),
        (SPLIT, 130, "per_tensor", False, jnp.float16),
        (SPLIT_WIDE, 130, "rowwise", True, jnp.float32),
        (SWAPPED, 5, "per_tensor", True, jnp.float16),
        (SWAPPED, 16, "rowwise", False, jnp.float32),
        (SWAPPED_SPLIT, 7, "rowwise", True, jnp.bfloat16),
    ],
    ids=["split_5", "split_130", "split_wide", "swapped_5", "swapped_16", "swapped_split"],
)
def test_rowwise_interpret(key, config, m, granularity, with_bias, out_dtype):
    m, k, n = _shape(config, m)
    check_rowwise(key, m, k, n, granularity, with_bias, out_dtype, interpret=True, config=config)


@pytest.mark.parametrize(
    "config, m, with_bias, out_dtype",
    [
        (SPLIT, 3, True, jnp.float32),
        (SPLIT_WIDE, 130, False, jnp.bfloat16),
        (SWAPPED, 3, False, jnp.bfloat16),
        (SWAPPED_SPLIT, 30, True, jnp.float32),
    ],
    ids=IDS,
)
def test_block_interpret(key, config, m, with_bias, out_dtype):
    m, k, n = _shape(config, m)
    check_block(key, m, k, n, with_bias, out_dtype, config=config)


@pytest.mark.parametrize("pipelined", [False, True], ids=["weight_scales_from_gmem", "pipelined_weight_scales"])
def test_block_interpret_off_the_blocks(key, pipelined):
    # K and N off the 128 blocks (zero-padded to them), the swapped schedule's weight rows in
    # 5 blocks: a token scale or a weight-block scale from the wrong place shows.
    config = dataclasses.replace(SWAPPED, k_splits=5, pipelined_weight_scales=pipelined)
    check_block(key, 9, 600, 520, True, jnp.float32, config=config)


@pytest.mark.parametrize("config", [SPLIT, SWAPPED_SPLIT], ids=["split", "swapped_split"])
def test_block_tolerance_catches_wrong_scales(key, config):
    """A scale from the next k-block (of another K slice, for some) or the next token fails the check."""
    m, k, n = 9, 768, 256
    qinput, weight, scale_a, scale_b, bias = block_operands(key, m, k, n, True)
    with platform.override(num_sms=2):
        out = gpu_block.block_scaled_mm(
            qinput, weight, scale_a, scale_b, BLOCK, bias, jnp.float32, interpret=True, config=config
        )
    tol = reference.gemm_tolerance(k, jnp.float32)
    assert relative_error(out, reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias)) <= tol
    for sa, sb in [
        (jnp.roll(scale_a, 1, axis=1), scale_b),
        (jnp.roll(scale_a, 1, axis=0), scale_b),
        (scale_a, jnp.roll(scale_b, 1, axis=0)),
        (scale_a, jnp.roll(scale_b, 1, axis=1)),
    ]:
        assert relative_error(out, reference.block_scaled_mm(qinput, weight, sa, sb, BLOCK, bias)) > tol


@pytest.mark.parametrize("config", [SWAPPED_SPLIT, SPLIT], ids=["swapped_split", "split"])
def test_non_finite_code_stays_in_its_row(key, config):
    """Swapped, a token is a column of the kernel's tile and split, its row is summed from slices:
    a NaN activation code still reaches its own row of the output only."""
    qinput, weight, scale_a, scale_b, _ = block_operands(key, 9, 768, 256, False)
    qinput = qinput.at[4, 700].set(jnp.nan)
    with platform.override(num_sms=2):
        out = np.asarray(
            gpu_block.block_scaled_mm(
                qinput, weight, scale_a, scale_b, BLOCK, None, jnp.float32, interpret=True, config=config
            )
        )
    assert np.isnan(out[4]).all() and np.isfinite(np.delete(out, 4, axis=0)).all()


def test_rejects_splits_that_do_not_divide_k(key):
    qinput, weight, scale_a, scale_b, _ = block_operands(key, 8, 512, 256, False)
    config = dataclasses.replace(SWAPPED, k_splits=3)
    with pytest.raises(ValueError, match="tile_k \\* k_splits = 384"):
        gpu_mm.scaled_mm(qinput, weight, scale_a[:, :1], scale_b[:1, :1], None, jnp.float32, config=config)
    with pytest.raises(ValueError, match="multiples of 128 and 384"):
        gpu_block.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, config=config)
    with pytest.raises(ValueError, match="tile_m <= 128"):
        gpu_block.block_scaled_mm(
            qinput, weight, scale_a, scale_b, BLOCK, config=dataclasses.replace(SWAPPED, tile_m=192)
        )
    with pytest.raises(ValueError, match="M <= 64"):
        tbs.decode_config(65, 4096, 4096, 2, 132)
    with pytest.raises(ValueError, match="block scales only"):
        config = dataclasses.replace(SWAPPED, pipelined_weight_scales=True)
        gpu_mm.scaled_mm(qinput, weight, scale_a[:, :1], scale_b[:1, :1], None, jnp.float32, config=config)


# --- the model that picks the split ----------------------------------------------------------------


@pytest.mark.parametrize(
    "m, k, n, splits",
    [
        (128, 14336, 4096, 4),  # 16 cluster tiles on 66 slots: 4 slices fill one wave
        (128, 4096, 6144, 2),
        (4096, 8192, 8192, 1),  # 1,024 tiles: no split
        (512, 4096, 6144, 1),  # 48 tiles on 66 slots, but 4 slices' float32 sums cost more than the idle slots
    ],
)
def test_split_config(m, k, n, splits):
    config = tbs.split_config(m, k, n, 2, num_sms=132)
    assert config.k_splits == splits
    assert (k // config.tile_k) % (config.k_splits * (config.stages if config.persistent_pipeline else 1)) == 0
    if splits == 1:
        assert config == tbs.launch_config(m, k, n, 2, num_sms=132)


@pytest.mark.parametrize(
    "m, k, n, tokens, splits",
    [
        (1, 4096, 28672, 16, 1),  # 224 tiles: 2 waves 85% busy; 4 slices, 97%, predicted only 4% faster
        (16, 7168, 24576, 16, 2),
        (33, 14336, 4096, 64, 4),  # 32 tiles: 4 slices fill one wave
    ],
)
def test_decode_config(m, k, n, tokens, splits):
    config = tbs.decode_config(m, k, n, 2, num_sms=132)
    assert config.swap_ab and config.cluster is None and config.tile_n == tokens and config.k_splits == splits
    assert tbs.work_units(config, m, n) == -(-n // config.cta_m) * splits


def test_small_m_config():
    assert tbs.small_m_config(64, 4096, 6144, 2, 132).swap_ab
    split = tbs.small_m_config(128, 14336, 4096, 2, 132)
    assert split.k_splits == 4 and not split.swap_ab
    assert tbs.small_m_config(4096, 8192, 8192, 2, 132) is None


def test_predicted_seconds_counts_the_float32_sums():
    base = tbs.NARROW_GEMM
    split = dataclasses.replace(base, k_splits=4)
    m, k, n = 512, 4096, 6144  # enough tiles for both: only the sums differ
    extra = tbs.predicted_seconds(split, m, k, n, 2, 1) - tbs.predicted_seconds(base, m, k, n, 2, 1)
    assert extra == pytest.approx(2 * 4 * 4 * m * n / tbs.COPY_BYTES_PER_S)


# --- the lowering for CUDA, at real shapes ----------------------------------------------------------


@pytest.mark.parametrize(
    "m, k, n, choose",
    [
        (1, 4096, 28672, "decode"),
        (64, 14336, 4096, "decode"),
        (16, 7168, 2112, "decode"),  # N padded to the block
        (128, 14336, 4096, "split"),
        (128, 7168, 2112, "split"),
    ],
)
@pytest.mark.parametrize("kind", ["rowwise", "block"])
def test_lowers(m, k, n, choose, kind):
    np_ = layout.round_up(n, 128)
    config = (tbs.decode_config if choose == "decode" else tbs.split_config)(m, k, np_, 2, 132)
    assert config.raw_out
    assert gemm_lowers(kind, m, k, n, config)


# --- on a Hopper GPU ------------------------------------------------------------------------------


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize(
    "m, k, n, choose",
    [
        (1, 4096, 28672, "decode"),
        (16, 7168, 2112, "decode"),
        (64, 18432, 7168, "decode"),
        (128, 14336, 4096, "split"),
        (256, 7168, 2112, "split"),
    ],
)
def test_hopper(key, m, k, n, choose):
    np_ = layout.round_up(n, 128)
    config = (tbs.decode_config if choose == "decode" else tbs.split_config)(m, k, np_, 2, platform.num_sms())
    check_block(key, m, k, n, True, jnp.bfloat16, interpret=False, config=config)
    if n % 16 == 0:
        check_rowwise(key, m, k, n, "rowwise", True, jnp.bfloat16, interpret=False, config=config)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
def test_hopper_long_k_promotes_in_float32(key):
    config = tbs.decode_config(8, 18432, 512, 4, platform.num_sms())
    assert check_block(key, 8, 18432, 512, False, jnp.float32, interpret=False, config=config) <= (
        reference.TENSOR_CORE_FLOOR
    )
