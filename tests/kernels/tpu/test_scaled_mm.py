"""The TPU fp8 GEMM in interpret mode against the float64 NumPy reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests import reference
from tests.kernels.tpu.conftest import INTERPRET
from w8a8_jax.kernels.tpu import BlockSizes, fused_quant_scaled_mm, tuned_block_sizes, w8a8_scaled_mm

SMALL = BlockSizes(32, 128, 128)  # the smallest legal blocks: many grid steps on small shapes
# v6e: fp8 upcast to bf16 in-kernel; v7: fp8 operands straight to the MXU.
GENERATIONS = ["v6e", "v7"]


def make_operands(key, m, k, n, *, per_token, per_channel, with_bias, fp8_dtype=jnp.float8_e4m3fn):
    """fp8 codes spanning the e4m3 range, positive scales of distinct magnitudes, a bias."""
    ks = jax.random.split(key, 5)
    bound = reference.FP8_MAX[np.dtype(fp8_dtype)]
    # Clipped before the cast: an out-of-range value casts to NaN, not to the largest code.
    qinput = jnp.clip(jax.random.normal(ks[0], (m, k)) * bound / 4, -bound, bound).astype(fp8_dtype)
    weight = jnp.clip(jax.random.normal(ks[1], (n, k)) * bound / 4, -bound, bound).astype(fp8_dtype)
    scale_a = jax.random.uniform(ks[2], (m, 1) if per_token else (1,), minval=0.5, maxval=2.0) * 1e-2
    scale_b = jax.random.uniform(ks[3], (n, 1) if per_channel else (1,), minval=0.5, maxval=2.0) * 1e-3
    bias = jax.random.normal(ks[4], (n,)) * 4 if with_bias else None
    return qinput, weight, scale_a, scale_b, bias


def check_gemm(
    key,
    m,
    k,
    n,
    *,
    per_token=True,
    per_channel=True,
    with_bias=True,
    out_dtype=jnp.bfloat16,
    generation="v6e",
    blocks=SMALL,
    fp8_dtype=jnp.float8_e4m3fn,
):
    qinput, weight, scale_a, scale_b, bias = make_operands(
        key, m, k, n, per_token=per_token, per_channel=per_channel, with_bias=with_bias, fp8_dtype=fp8_dtype
    )
    out = w8a8_scaled_mm(
        qinput, weight, scale_a, scale_b, bias, out_dtype, blocks=blocks, generation=generation, interpret=INTERPRET
    )
    assert out.dtype == out_dtype and out.shape == (m, n)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), k, out_dtype)


@pytest.mark.parametrize(
    "generation, per_token, per_channel",
    [
        ("v6e", False, False),
        ("v6e", False, True),
        ("v6e", True, False),
        ("v6e", True, True),
        ("v7", False, False),
        ("v7", True, True),
    ],
)
def test_scale_granularities(key, generation, per_token, per_channel):
    # Not block multiples on any axis: M 70 (tile 32), K 300 and N 260 (tile 128); 3x3x3 grid.
    check_gemm(key, 70, 300, 260, per_token=per_token, per_channel=per_channel, generation=generation)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("out_dtype", [jnp.float16, jnp.float32])  # bfloat16: every other test
def test_out_dtypes(key, generation, out_dtype):
    check_gemm(key, 70, 300, 260, out_dtype=out_dtype, generation=generation)


@pytest.mark.parametrize(
    "m, k, n, with_bias",
    [
        (32, 128, 128, False),  # one block
        (64, 256, 384, True),  # block multiples, several blocks per axis
        (1, 256, 128, True),  # decode: one row padded to 32
        (17, 1025, 130, False),  # odd sizes; 9 k-steps
    ],
)
def test_shapes(key, m, k, n, with_bias):
    check_gemm(key, m, k, n, with_bias=with_bias)


def test_default_block_sizes(key):
    """blocks=None: table/fallback tiles (here one block covering the whole problem)."""
    check_gemm(key, 40, 640, 384, blocks=None, generation="v7")


def test_e4m3fnuz_upcasts_on_every_generation(key):
    check_gemm(key, 33, 256, 256, fp8_dtype=jnp.float8_e4m3fnuz, generation="v7", out_dtype=jnp.float32)


@pytest.mark.parametrize(
    "scale_a_shape, scale_b_shape", [((), ()), ((1, 1), (1, 1)), ((48,), (256,)), ((48, 1), (256,))]
)
def test_accepted_scale_shapes(key, scale_a_shape, scale_b_shape):
    qinput, weight, _, _, bias = make_operands(key, 48, 128, 256, per_token=False, per_channel=False, with_bias=True)
    scale_a = jnp.linspace(0.5, 1.5, int(np.prod(scale_a_shape))).reshape(scale_a_shape) * 1e-2
    scale_b = jnp.linspace(1.5, 0.5, int(np.prod(scale_b_shape))).reshape(scale_b_shape) * 1e-3
    out = w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32, blocks=SMALL, interpret=INTERPRET)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), 128, jnp.float32)


def test_long_k_accumulates_in_float32(key):
    """K = 4096 over 32 k-steps: a rounding of partial sums to bf16 would exceed the f32 bound."""
    check_gemm(key, 32, 4096, 128, out_dtype=jnp.float32)


def test_under_jit(key):
    qinput, weight, scale_a, scale_b, bias = make_operands(
        key, 40, 256, 256, per_token=True, per_channel=True, with_bias=True
    )
    fn = jax.jit(lambda *a: w8a8_scaled_mm(*a, jnp.bfloat16, blocks=SMALL, interpret=INTERPRET))
    out = fn(qinput, weight, scale_a, scale_b, bias)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), 256, jnp.bfloat16)


# --- in-kernel activation quantization -------------------------------------------------------------


def check_fused_quant(
    key,
    m,
    k,
    n,
    *,
    static,
    scale_ub=None,
    blocks=SMALL,
    generation="v6e",
    x_dtype=jnp.bfloat16,
    out_dtype=jnp.float32,
    x=None,
):
    ks = jax.random.split(key, 2)
    if x is None:
        x = (jax.random.normal(ks[0], (m, k)) * 3).astype(x_dtype)
    _, weight, _, weight_scale, bias = make_operands(ks[1], m, k, n, per_token=False, per_channel=True, with_bias=True)
    if static:
        input_scale = jnp.array([0.02], jnp.float32)
        codes, x_scale = reference.quant_static(x, input_scale), np.asarray(input_scale)
    else:
        input_scale = None
        codes, x_scale = reference.quant_dynamic_per_token(x, scale_ub)
    out = fused_quant_scaled_mm(
        x,
        weight,
        weight_scale,
        input_scale=input_scale,
        scale_ub=scale_ub,
        bias=bias,
        out_dtype=out_dtype,
        blocks=blocks,
        generation=generation,
        interpret=INTERPRET,
    )
    assert np.isfinite(np.asarray(out, np.float64)).all()
    reference.assert_gemm_close(out, reference.scaled_mm(codes, weight, x_scale, weight_scale, bias), k, out_dtype)


@pytest.mark.parametrize(
    "generation, x_dtype", [("v6e", jnp.bfloat16), ("v7", jnp.bfloat16), ("v6e", jnp.float16), ("v7", jnp.float32)]
)
def test_in_kernel_per_token_quant(key, generation, x_dtype):
    # K=300 fits one block, so rows are quantized in-kernel once and reused by 3 N blocks.
    check_fused_quant(
        key, 70, 300, 260, static=False, blocks=BlockSizes(32, 128, 384), generation=generation, x_dtype=x_dtype
    )


def test_per_token_with_scale_ub(key):
    check_fused_quant(
        key, 40, 256, 256, static=False, scale_ub=jnp.array([2.0], jnp.float32), blocks=BlockSizes(32, 128, 256)
    )


def test_per_token_k_over_one_block_is_refused(key):
    """tile_k < K: in-kernel per-token quantization needs the whole row; the kernel says so (the
    dispatch plan runs the separate quant kernel, then the GEMM, for such rows)."""
    with pytest.raises(ValueError, match="needs the whole row"):
        check_fused_quant(key, 40, 512, 256, static=False, blocks=SMALL)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("blocks", [SMALL, BlockSizes(32, 128, 384)], ids=["k_steps", "k_one_block"])
def test_in_kernel_static_quant(key, generation, blocks):
    """Static input scale quantized in the kernel, tile by tile (3 k-steps) or cached (one k block)."""
    check_fused_quant(key, 70, 300, 260, static=True, blocks=blocks, generation=generation)


def test_fused_quant_default_blocks(key):
    check_fused_quant(key, 24, 512, 384, static=False, blocks=None, out_dtype=jnp.bfloat16)


# --- validation -----------------------------------------------------------------------------------


def test_rejects_illegal_tiles(key):
    qinput, weight, scale_a, scale_b, _ = make_operands(
        key, 32, 128, 128, per_token=False, per_channel=False, with_bias=False
    )
    with pytest.raises(ValueError, match="tile_m=16 must be a positive multiple of 32"):
        w8a8_scaled_mm(qinput, weight, scale_a, scale_b, blocks=BlockSizes(16, 128, 128), interpret=INTERPRET)
    with pytest.raises(ValueError, match="tile_n=96 must be a positive multiple of 128"):
        w8a8_scaled_mm(qinput, weight, scale_a, scale_b, blocks=BlockSizes(32, 96, 128), interpret=INTERPRET)


def test_rejects_blocks_over_vmem_budget(key):
    qinput, weight, scale_a, scale_b, _ = make_operands(
        key, 32, 128, 128, per_token=False, per_channel=False, with_bias=False
    )
    with pytest.raises(ValueError, match=r"MiB of VMEM, over the 12.0 MiB budget on TPU v4"):
        w8a8_scaled_mm(
            qinput, weight, scale_a, scale_b, blocks=BlockSizes(2048, 2048, 2048), generation="v4", interpret=INTERPRET
        )


def test_rejects_bad_operands(key):
    qinput, weight, scale_a, scale_b, _ = make_operands(
        key, 32, 128, 128, per_token=False, per_channel=False, with_bias=False
    )
    with pytest.raises(TypeError, match="share one fp8 dtype"):
        w8a8_scaled_mm(qinput, weight.astype(jnp.float8_e4m3fnuz), scale_a, scale_b, interpret=INTERPRET)
    with pytest.raises(ValueError, match="generation must be one of"):
        w8a8_scaled_mm(qinput, weight, scale_a, scale_b, generation="v3", interpret=INTERPRET)
    with pytest.raises(ValueError, match="scale_ub applies only"):
        fused_quant_scaled_mm(
            jnp.ones((32, 128)),
            weight,
            scale_b,
            input_scale=jnp.ones((1,)),
            scale_ub=jnp.ones((1,)),
            interpret=INTERPRET,
        )


def test_fallback_tiles_divide_padded_dims():
    gen = tuned_block_sizes.hardware.GENERATIONS["v6e"]
    blocks = tuned_block_sizes.get_block_sizes(gen, 5000, 14336, 1280)
    assert (blocks.tile_m, 14336 % blocks.tile_k, 1280 % blocks.tile_n) == (512, 0, 0)
    assert tuned_block_sizes.get_block_sizes(gen, 3, 4096, 4096) == BlockSizes(32, 1024, 2048)  # table, small m
    for (name, _, k, n), blocks in tuned_block_sizes.TUNED_BLOCK_SIZES.items():
        tuned_block_sizes.check_tiling(blocks)
        assert k % blocks.tile_k == 0 and n % blocks.tile_n == 0


def test_reference_is_independent():
    """The reference quantizer is NumPy (guards against a refactor making it call the code under test)."""
    codes, _ = reference.quant_dynamic_per_token(np.ones((2, 4), np.float32))
    assert isinstance(codes, np.ndarray) and codes.dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("static", [False, True])
def test_in_kernel_codes_and_scales_are_exact(key, static):
    """With an identity weight and unit weight scale, out = code * scale exactly (one float32 product
    per element, no sums), so the in-kernel codes and scales are checked bit for bit."""
    m, k = 40, 256
    x = (jax.random.normal(key, (m, k)) * 10.0 ** jnp.linspace(-3, 2, m)[:, None]).astype(jnp.bfloat16)
    identity = jnp.eye(k, dtype=jnp.float32).astype(jnp.float8_e4m3fn)
    unit = jnp.ones((1,), jnp.float32)
    if static:
        input_scale = jnp.array([0.05], jnp.float32)
        codes, x_scale = reference.quant_static(x, input_scale), np.asarray(input_scale)
    else:
        input_scale = None
        codes, x_scale = reference.quant_dynamic_per_token(x)
    out = fused_quant_scaled_mm(
        x,
        identity,
        unit,
        input_scale=input_scale,
        out_dtype=jnp.float32,
        blocks=BlockSizes(32, 128, 256),
        interpret=INTERPRET,
    )
    # + 0 turns the -0 of negative zero codes into the +0 that a sum of products gives.
    want = codes.astype(np.float32) * x_scale.astype(np.float32) + np.float32(0)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), want.view(np.uint32))
