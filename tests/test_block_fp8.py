"""Block-scaled fp8 (DeepSeek-V3 / Qwen3-FP8): per-token-group quantization, block weights, the block
GEMM and `W8A8BlockFp8LinearOp`, against the float64 references of `tests/reference.py`."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import w8a8_jax
from tests import reference
from w8a8_jax import block_scaled_mm, dispatch, platform, quantization, scaled_mm
from w8a8_jax.platform import FusedKernel
from w8a8_jax.scheme import Fp8Scheme

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = (128, 128)


def activations(key, m, k, dtype=jnp.float32):
    """Rows of mixed magnitude with an outlier group (30x the rest) and an all-zero group."""
    x = jax.random.normal(key, (m, k), jnp.float32) * jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), (m, 1)))
    x = x.at[:, : min(k, 128)].multiply(30.0)
    if k >= 384:  # never the last group, whose (partial) block must carry data
        x = x.at[:, 128:256].set(0.0)
    return x.astype(dtype)


def block_weight(key, n, k):
    """A float weight whose blocks differ in scale (so a wrong block index changes the result)."""
    w = jax.random.normal(key, (n, k), jnp.float32) * 0.05
    rows = jnp.arange(n)[:, None] // 128
    cols = jnp.arange(k)[None, :] // 128
    return w * (1.0 + rows + 2.0 * (cols % 3))


# --- quantization -------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("k", [128, 576, 2112, 200])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_group_quant_is_bit_identical_to_the_reference(key, m, k, dtype):
    x = activations(key, m, k, dtype)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3)
    want_q, want_scale = reference.quant_per_token_group(x, 128)
    assert scale.shape == (m, -(-k // 128))
    reference.assert_bit_identical(q, want_q)
    reference.assert_bit_identical(scale, want_scale)


@pytest.mark.parametrize("group", [32, 64, 100])
@pytest.mark.parametrize("fp8_dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz])
def test_group_quant_other_groups_and_dtypes(key, group, fp8_dtype):
    x = activations(key, 9, 300)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, group, fp8_dtype=fp8_dtype)
    want_q, want_scale = reference.quant_per_token_group(x, group, fp8_dtype)
    reference.assert_bit_identical(q, want_q)
    reference.assert_bit_identical(scale, want_scale)


def test_group_quant_ue8m0_scales_are_powers_of_two_rounded_up(key):
    x = activations(key, 33, 576)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, use_ue8m0=True, fp8_dtype=E4M3)
    want_q, want_scale = reference.quant_per_token_group(x, 128, ue8m0=True)
    reference.assert_bit_identical(scale, want_scale)
    reference.assert_bit_identical(q, want_q)
    mantissa, _ = np.frexp(np.asarray(scale))
    assert (mantissa == 0.5).all()
    _, plain = w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3)
    scale, plain = np.asarray(scale), np.asarray(plain)
    assert (scale >= plain).all()
    unfloored = plain >= 1e-10  # the all-zero group's scale is floored first (next test)
    assert unfloored.sum() > unfloored.size // 2 and (scale[unfloored] < 2 * plain[unfloored]).all()


def test_group_quant_ue8m0_floors_tiny_scales_at_1e_10_first(key):
    """vLLM rounds max(s, 1e-10) up to a power of two: a tiny group gets 2^-33, not its own power."""
    x = jnp.zeros((2, 256), jnp.float32).at[0, :128].set(1e-9).at[1, :128].set(1.0)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, use_ue8m0=True, fp8_dtype=E4M3)
    np.testing.assert_array_equal(np.asarray(scale)[:, 1], np.float32(2.0**-33))  # all-zero groups
    assert np.asarray(scale)[0, 0] == np.float32(2.0**-33) and np.asarray(scale)[1, 0] == np.float32(2.0**-8)
    want_q, want_scale = reference.quant_per_token_group(x, 128, ue8m0=True)
    reference.assert_bit_identical(q, want_q)
    reference.assert_bit_identical(scale, want_scale)


def test_group_quant_eps_floors_an_all_zero_group_and_leading_dims_are_kept(key):
    x = activations(key, 6, 384).reshape(2, 3, 384)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, eps=1e-6, fp8_dtype=E4M3)
    assert q.shape == (2, 3, 384) and scale.shape == (2, 3, 3)
    np.testing.assert_array_equal(np.asarray(scale)[..., 1], np.float32(1e-6) / np.float32(448))
    want_q, want_scale = reference.quant_per_token_group(x.reshape(6, 384), 128, eps=1e-6)
    reference.assert_bit_identical(np.asarray(q).reshape(6, 384), want_q)
    reference.assert_bit_identical(np.asarray(scale).reshape(6, 3), want_scale)


def test_group_quant_non_finite_values_stay_in_their_element(key):
    x = activations(key, 4, 384)
    x = x.at[1, 5].set(jnp.nan).at[2, 300].set(jnp.inf).at[3, 0].set(-jnp.inf)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3)
    want_q, want_scale = reference.quant_per_token_group(x, 128)
    reference.assert_codes_identical(q, want_q)
    reference.assert_bit_identical(scale, want_scale)
    assert np.isfinite(np.asarray(scale)).all()
    assert np.isnan(np.asarray(q)[1, 5].astype(np.float32))
    assert np.asarray(q)[2, 300].astype(np.float32) == 448 and np.asarray(q)[3, 0].astype(np.float32) == -448


def test_group_quant_jits(key):
    x = activations(key, 7, 576, jnp.bfloat16)
    eager = w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3)
    jitted = jax.jit(lambda x: w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3))(x)
    for a, b in zip(eager, jitted):
        reference.assert_bit_identical(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 0}, "group_size must be an int >= 1"),
        ({"group_size": 128.0}, "group_size must be an int >= 1"),
        ({"group_size": 128, "eps": 0.0}, "eps must be a finite float > 0"),
        ({"group_size": 128, "eps": float("nan")}, "eps must be a finite float > 0"),
    ],
)
def test_group_quant_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        w8a8_jax.per_token_group_quant_fp8(jnp.ones((2, 256)), **kwargs)
    with pytest.raises(TypeError, match="input must be bfloat16, float16 or float32"):
        w8a8_jax.per_token_group_quant_fp8(jnp.ones((2, 256), jnp.int32), 128)


@pytest.mark.parametrize("n, k", [(576, 2112), (256, 256), (130, 200), (1, 7)])
def test_block_weight_quant_is_bit_identical_to_the_reference(key, n, k):
    w = block_weight(key, n, k)
    if n > 128 and k > 128:
        w = w.at[128:256, 128:256].set(0.0)  # an all-zero block gets the floor scale
    q, scale = quantization.quantize_weight(w, "block", E4M3, block_size=BLOCK)
    want_q, want_scale = reference.quant_block_weight(w, BLOCK)
    reference.assert_bit_identical(q, want_q)
    reference.assert_bit_identical(scale, want_scale)
    dequantized = np.asarray(quantization.dequantize_weight(q, scale, BLOCK))
    # float32 products are correctly rounded: the float64 reference rounded once.
    np.testing.assert_array_equal(
        dequantized, reference.dequantize_blocks(want_q, want_scale, BLOCK).astype(np.float32)
    )
    # fp8 keeps 3 mantissa bits: within 2^-4 of each block's largest value.
    assert np.abs(dequantized - np.asarray(w)).max() <= np.abs(np.asarray(w)).max() * 2.0**-4


def test_block_weight_quant_rejects_non_finite_weights(key):
    w = block_weight(key, 256, 256).at[3, 4].set(jnp.nan)
    with pytest.raises(ValueError, match="the kernel holds 1 NaN or Inf value"):
        quantization.quantize_weight(w, "block", E4M3, block_size=BLOCK, name="the kernel")


# --- the block GEMM -----------------------------------------------------------------------------


def block_operands(key, m, k, n, block=BLOCK):
    k_x, k_w = jax.random.split(key)
    q, scale_a = reference.quant_per_token_group(activations(k_x, m, k), block[1])
    w, scale_b = reference.quant_block_weight(block_weight(k_w, n, k), block)
    return jnp.asarray(q), jnp.asarray(w), jnp.asarray(scale_a), jnp.asarray(scale_b)


@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("k, n", [(576, 576), (2112, 640), (5120, 256), (128, 2112), (200, 130)])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_block_matmul_matches_float64(key, m, k, n, out_dtype):
    qinput, weight, scale_a, scale_b = block_operands(key, m, k, n)
    out = w8a8_jax.w8a8_block_fp8_matmul(qinput, weight, scale_a, scale_b, [128, 128], out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    ref = reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK)
    reference.assert_gemm_close(out, ref, k, out_dtype)


@pytest.mark.parametrize("block", [(64, 128), (128, 64), (256, 128)])
def test_block_matmul_other_block_shapes_and_bias(key, block):
    qinput, weight, scale_a, scale_b = block_operands(key, 9, 576, 320, block)
    bias = jax.random.normal(jax.random.fold_in(key, 7), (320,)) * 10
    out = block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, block, bias, jnp.float32)
    reference.assert_gemm_close(
        out, reference.block_scaled_mm(qinput, weight, scale_a, scale_b, block, bias), 576, jnp.float32
    )


# The dequantized path keeps ~16 bits of each operand (bf16 head and tail): 2^-14 of max |ref|
# allows four such rounding steps and is still 2^9 below a wrong block scale's error (x1.5 or more).
DEQUANT_TOLERANCE = 2.0**-14


@pytest.mark.parametrize("m, k, n", [(1, 576, 576), (33, 2112, 640), (130, 200, 130)])
def test_block_dequant_matmul_matches_float64(key, m, k, n):
    qinput, weight, scale_a, scale_b = block_operands(key, m, k, n)
    bias = jax.random.normal(jax.random.fold_in(key, 3), (n,)) * 10
    ref = reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias)
    out = block_scaled_mm.xla_block_dequant_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias, jnp.float32)
    err = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= DEQUANT_TOLERANCE, err
    out = block_scaled_mm.xla_block_dequant_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias, jnp.bfloat16)
    reference.assert_gemm_close(out, ref, k, jnp.bfloat16)


def test_plan_runs_the_dequantized_block_gemm_on_cuda_from_4m_outputs(key, monkeypatch):
    """Where cuBLASLt runs the fp8 GEMMs (CUDA) and no block kernel is registered, the plan takes
    the dequantized formulation from M x N = 4Mi outputs on (measured on the H200); the plan's GEMM
    then runs."""
    weight, weight_scale = quantized_layer(key, 4096, 256)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    big, small = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16), jax.ShapeDtypeStruct((896, 256), jnp.bfloat16)
    if jax.default_backend() == "cpu":  # on CPU always dequantized (per-k-block products are slow there)
        assert op.plan(small, weight, weight_scale).gemm == dispatch.XLA_BLOCK_DEQUANT_GEMM
    monkeypatch.setattr(scaled_mm, "fp8_dot_is_cublas", lambda dtype: True)
    with platform.override(fused_kernel=None):  # on Hopper the block kernel would take both
        assert op.plan(big, weight, weight_scale).gemm == dispatch.XLA_BLOCK_DEQUANT_GEMM
        assert op.plan(small, weight, weight_scale).gemm == dispatch.XLA_BLOCK_GEMM
        x = activations(jax.random.fold_in(key, 1), 1024, 256)
        out = jax.jit(lambda x: op.apply(x, weight, weight_scale, out_dtype=jnp.float32))(x)
    ref = op_reference(x, weight, weight_scale)
    assert np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max() <= DEQUANT_TOLERANCE


def test_dequant_upcast_follows_a_barrier(key):
    """The dequantized GEMM's codes cross an optimization barrier before their upcast: without it
    XLA:GPU folds the group quant's `f32 -> fp8 -> f32` away when both run in one program (the test
    above then fails on a GPU, 2% off; on CPU only this structural check can fail)."""
    qinput, weight, scale_a, scale_b = block_operands(key, 8, 256, 128)
    text = (
        jax.jit(block_scaled_mm.xla_block_dequant_w8a8_scaled_mm, static_argnums=(4, 6))
        .lower(qinput, weight, scale_a, scale_b, BLOCK, None, jnp.float32)
        .as_text()
    )
    barrier = text.index("stablehlo.optimization_barrier")
    assert barrier < text.index("stablehlo.convert") < text.index("stablehlo.dot_general")


def test_block_matmul_row_chunks_equal_one_shot(key, monkeypatch):
    """More rows than `PARTIAL_PRODUCT_BYTES` holds run in row chunks (the last one padded)."""
    qinput, weight, scale_a, scale_b = block_operands(key, 37, 576, 256)
    one_shot = block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, None, jnp.float32)
    monkeypatch.setattr(block_scaled_mm, "PARTIAL_PRODUCT_BYTES", 5 * 256 * 8 * 4)  # 8 rows per chunk
    block_scaled_mm._xla_block.clear_cache()
    chunked = block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, None, jnp.float32)
    block_scaled_mm._xla_block.clear_cache()
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(one_shot), rtol=1e-6, atol=1e-6)
    reference.assert_gemm_close(
        chunked, reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK), 576, jnp.float32
    )


def test_block_matmul_catches_a_wrong_block_index(key):
    """The reference check fails on weight scales shifted by one block: the tolerance has teeth."""
    qinput, weight, scale_a, scale_b = block_operands(key, 7, 576, 384)
    out = w8a8_jax.w8a8_block_fp8_matmul(qinput, weight, scale_a, scale_b, [128, 128], out_dtype=jnp.float32)
    shifted = reference.block_scaled_mm(qinput, weight, scale_a, np.roll(np.asarray(scale_b), 1, axis=1), BLOCK)
    with pytest.raises(AssertionError, match="exceeds"):
        reference.assert_gemm_close(out, shifted, 576, jnp.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"scale_b": jnp.ones((2, 5))}, ValueError, r"scale_b must be \(3, 5\), one per 128x128 block of weight"),
        ({"scale_a": jnp.ones((7, 4))}, ValueError, r"scale_a must be \(7, 5\), one per 1x128 block of qinput"),
        ({"block_size": [128]}, ValueError, "block_size must be two ints >= 1"),
        ({"block_size": [0, 128]}, ValueError, "block_size must be two ints >= 1"),
        ({"scale_b": -jnp.ones((3, 5))}, ValueError, "scale_b must be finite and > 0"),
        ({"scale_a": jnp.full((7, 5), jnp.nan)}, ValueError, "scale_a must be finite and > 0"),
        ({"weight": jnp.ones((384, 576), jnp.bfloat16)}, TypeError, "weight must be float8_e4m3fn"),
        ({"weight": jnp.ones((384, 512), E4M3)}, ValueError, r"weight must be \(N, K\) with K=576"),
    ],
)
def test_block_matmul_rejects_bad_operands(key, change, error, match):
    qinput, weight, scale_a, scale_b = block_operands(key, 7, 576, 384)
    args = {"qinput": qinput, "weight": weight, "scale_a": scale_a, "scale_b": scale_b, "block_size": [128, 128]}
    with pytest.raises(error, match=match):
        w8a8_jax.w8a8_block_fp8_matmul(**{**args, **change})


# --- W8A8BlockFp8LinearOp -----------------------------------------------------------------------


def quantized_layer(key, n, k):
    w = block_weight(key, n, k)
    q, scale = reference.quant_block_weight(w, BLOCK)
    return jnp.asarray(q), jnp.asarray(scale)


def op_reference(x, weight, weight_scale, bias=None):
    """float64 of the op: the reference group quantization of `x (..., K)`, then the block GEMM."""
    k = x.shape[-1]
    q, scale_a = reference.quant_per_token_group(np.asarray(x).reshape(-1, k), 128)
    out = reference.block_scaled_mm(q, weight, scale_a, weight_scale, BLOCK, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("k, n", [(576, 576), (2112, 640)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_op_matches_float64(key, m, k, n, dtype):
    k_x, k_w, k_b = jax.random.split(key, 3)
    weight, weight_scale = quantized_layer(k_w, n, k)
    x = activations(k_x, m, k, dtype)
    bias = (jax.random.normal(k_b, (n,)) * 5).astype(dtype)
    out = w8a8_jax.W8A8BlockFp8LinearOp().apply(x, weight, weight_scale, bias=bias)
    assert out.dtype == dtype and out.shape == (m, n)
    reference.assert_gemm_close(out, op_reference(x, weight, weight_scale, bias), k, dtype)


def test_op_eager_padded_equals_jit_and_keeps_leading_dims(key):
    weight, weight_scale = quantized_layer(key, 640, 576)
    x = activations(jax.random.fold_in(key, 1), 2 * 5, 576).reshape(2, 5, 576)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    eager = op.apply(x, weight, weight_scale, out_dtype=jnp.float32)  # 10 rows run as the bucket of 16
    jitted = jax.jit(lambda x: op.apply(x, weight, weight_scale, out_dtype=jnp.float32))(x)
    assert eager.shape == jitted.shape == (2, 5, 640)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-6, atol=1e-5)
    reference.assert_gemm_close(
        np.asarray(eager).reshape(10, 640), op_reference(x, weight, weight_scale).reshape(10, 640), 576, jnp.float32
    )


def test_op_takes_fp8_input_with_its_group_scales(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    x = activations(jax.random.fold_in(key, 1), 6, 576).reshape(2, 3, 576)
    q, scale = w8a8_jax.per_token_group_quant_fp8(x, 128, fp8_dtype=E4M3)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    out = op.apply(q, weight, weight_scale, input_scale=scale)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 256)
    float_out = op.apply(x, weight, weight_scale, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(float_out))
    assert op.plan(q, weight, weight_scale, input_scale=scale).quantizer is None


def test_op_on_no_rows_returns_zeros(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    out = w8a8_jax.W8A8BlockFp8LinearOp().apply(jnp.ones((0, 576), jnp.bfloat16), weight, weight_scale)
    assert out.shape == (0, 256) and out.dtype == jnp.bfloat16


def test_op_nan_in_one_token_leaves_the_others(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    x = activations(jax.random.fold_in(key, 1), 5, 576)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    clean = np.asarray(op.apply(x, weight, weight_scale, out_dtype=jnp.float32))
    poisoned = np.asarray(op.apply(x.at[2, 400].set(jnp.nan), weight, weight_scale, out_dtype=jnp.float32))
    assert np.isnan(poisoned[2]).all()
    np.testing.assert_array_equal(np.delete(poisoned, 2, axis=0), np.delete(clean, 2, axis=0))


def test_op_gradient_is_the_straight_through_estimate(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    x = activations(jax.random.fold_in(key, 1), 4, 576)
    g = jax.random.normal(jax.random.fold_in(key, 2), (4, 256))
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    dx = jax.grad(lambda x: jnp.sum(op.apply(x, weight, weight_scale) * g))(x)
    want = np.asarray(g, np.float64) @ reference.dequantize_blocks(weight, weight_scale, BLOCK)
    reference.assert_gemm_close(dx, want, 256, jnp.float32)


def test_op_plan_is_the_xla_block_path_without_a_kernel(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    with platform.override(fused_kernel=None):  # none on CPU; on Hopper the registered one is set aside
        plan = w8a8_jax.W8A8BlockFp8LinearOp().plan(jax.ShapeDtypeStruct((7, 576), jnp.bfloat16), weight, weight_scale)
    # XLA:CPU runs the block GEMM dequantized (its per-k-block products are slow there).
    xla_gemm = dispatch.XLA_BLOCK_DEQUANT_GEMM if jax.default_backend() == "cpu" else dispatch.XLA_BLOCK_GEMM
    assert (plan.quantizer, plan.gemm, plan.block_size) == ("quantize_per_token_group", xla_gemm, BLOCK)


def test_plan_picks_a_registered_block_kernel_where_it_takes_the_shape(key):
    """A block kernel registered on the platform runs where its `supports` says so, else XLA's."""
    calls = []

    def block_kernel(qinput, weight, scale_a, scale_b, block_size, bias, out_dtype):
        calls.append(qinput.shape)
        return block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, block_size, bias, out_dtype)

    kernel = FusedKernel(
        scaled_mm=lambda *args: None,
        supports_device=lambda device: True,
        block_scaled_mm=block_kernel,
        block_scaled_mm_supports=lambda m, k, n, block_size, fp8_dtype: k % 128 == 0,
    )
    weight, weight_scale = quantized_layer(key, 256, 512)
    x = activations(jax.random.fold_in(key, 1), 8, 512)
    with platform.override(fused_kernel=kernel):
        op = w8a8_jax.W8A8BlockFp8LinearOp()
        plan = op.plan(x, weight, weight_scale)
        assert (plan.quantizer, plan.gemm) == ("quantize_per_token_group", dispatch.KERNEL_BLOCK_SCALED_MM)
        out = op.apply(x, weight, weight_scale, out_dtype=jnp.float32)
        reference.assert_gemm_close(out, op_reference(x, weight, weight_scale), 512, jnp.float32)
        assert calls == [(8, 512)]
        odd_weight, odd_scale = quantized_layer(key, 256, 576)
        xla_gemm = dispatch.XLA_BLOCK_DEQUANT_GEMM if jax.default_backend() == "cpu" else dispatch.XLA_BLOCK_GEMM
        assert op.plan(activations(key, 8, 576), odd_weight, odd_scale).gemm == xla_gemm
        assert w8a8_jax.W8A8BlockFp8LinearOp(fused_supported=False).plan(x, weight, weight_scale).gemm == xla_gemm


def test_plan_picks_a_registered_group_quant_kernel_where_it_takes_k(key):
    """A group quant kernel registered on the platform quantizes the float input where its
    `supports` says so, also ahead of XLA's block GEMM, else the XLA formula does."""
    calls = []

    def group_quant(x, group_size, fp8_dtype):
        calls.append(x.shape)
        return quantization.quantize_per_token_group(x, group_size, fp8_dtype)

    kernel = FusedKernel(
        scaled_mm=lambda *args: None,
        supports_device=lambda device: True,
        per_token_group_quant=group_quant,
        per_token_group_quant_supports=lambda m, k, group_size, x_dtype, fp8_dtype: k % 256 == 0,
    )
    xla_gemm = dispatch.XLA_BLOCK_DEQUANT_GEMM if jax.default_backend() == "cpu" else dispatch.XLA_BLOCK_GEMM
    weight, weight_scale = quantized_layer(key, 256, 512)
    x = activations(jax.random.fold_in(key, 1), 8, 512)
    with platform.override(fused_kernel=kernel):
        op = w8a8_jax.W8A8BlockFp8LinearOp()
        plan = op.plan(x, weight, weight_scale)
        assert (plan.quantizer, plan.gemm, plan.kernel) == (dispatch.KERNEL_PER_TOKEN_GROUP_QUANT, xla_gemm, kernel)
        out = op.apply(x, weight, weight_scale, out_dtype=jnp.float32)
        reference.assert_gemm_close(out, op_reference(x, weight, weight_scale), 512, jnp.float32)
        assert calls == [(8, 512)]
        odd_weight, odd_scale = quantized_layer(key, 256, 640)
        assert op.plan(activations(key, 8, 640), odd_weight, odd_scale).quantizer == dispatch.QUANTIZE_PER_TOKEN_GROUP


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda op, x, w, s: op.apply(x, w, s[:, :4]), ValueError, r"weight_scale must be \(2, 5\)"),
        (lambda op, x, w, s: op.apply(x, w, -s), ValueError, "weight_scale must be finite and > 0"),
        (lambda op, x, w, s: op.apply(x[:, :500], w, s), ValueError, r"input must be \(\.\.\., K\) with K=576"),
        (lambda op, x, w, s: op.apply(x, w, s, input_scale=jnp.ones((3, 5))), ValueError, "input_scale goes with fp8"),
        (lambda op, x, w, s: op.apply(x.astype(E4M3), w, s), ValueError, r"fp8 input needs its input_scale, \(3, 5\)"),
        (
            lambda op, x, w, s: op.apply(x.astype(E4M3), w, s, input_scale=jnp.ones((3, 4))),
            ValueError,
            r"input_scale must be \(3, 5\)",
        ),
        (lambda op, x, w, s: op.apply(x, w, s, bias=jnp.ones((7,))), ValueError, r"bias must have shape \(256,\)"),
        (lambda op, x, w, s: op.apply(x, w, s, out_dtype=jnp.int8), ValueError, "out_dtype must be"),
    ],
)
def test_op_rejects_bad_arguments(key, call, error, match):
    weight, weight_scale = quantized_layer(key, 256, 576)
    with pytest.raises(error, match=match):
        call(w8a8_jax.W8A8BlockFp8LinearOp(), jnp.ones((3, 576), jnp.bfloat16), weight, weight_scale)


def test_fp8_linear_op_points_block_scales_to_the_block_op(key):
    weight, weight_scale = quantized_layer(key, 256, 576)
    with pytest.raises(ValueError, match=r"weight_scale of shape \(2, 5\) .* run on W8A8BlockFp8LinearOp"):
        w8a8_jax.Fp8LinearOp().apply(jnp.ones((3, 576), jnp.bfloat16), weight, weight_scale)


def test_op_group_must_be_the_weight_blocks_bk():
    with platform.override(fused_kernel=None), pytest.raises(ValueError, match="no block-scaled fp8 kernel runs"):
        w8a8_jax.W8A8BlockFp8LinearOp(fused_supported=True)  # none on CPU; Hopper's set aside
    with pytest.raises(ValueError, match=r"act_quant_group_shape must be \(1, 128\)"):
        w8a8_jax.W8A8BlockFp8LinearOp((128, 128), (1, 64))
    op = w8a8_jax.W8A8BlockFp8LinearOp((64, 256), (1, 256))
    assert op.block_size == (64, 256)


# --- the scheme ---------------------------------------------------------------------------------


def test_block_scheme_defaults_and_contradictions():
    scheme = Fp8Scheme("block")
    assert (scheme.activation_scheme, scheme.block_size, scheme.is_block) == ("dynamic_per_token_group", BLOCK, True)
    assert Fp8Scheme("block", block_size=[64, 256]).block_size == (64, 256)
    assert Fp8Scheme.from_names("block", "dynamic-token") == scheme
    assert dataclasses.replace(scheme, block_size=(128, 64)).block_size == (128, 64)
    with pytest.raises(ValueError, match="block weights quantize their activations per token group"):
        Fp8Scheme("block", "static")
    with pytest.raises(ValueError, match="goes with block weights"):
        Fp8Scheme("per_channel", "dynamic_per_token_group")
    with pytest.raises(ValueError, match="block_size applies only to weight_granularity='block'"):
        Fp8Scheme("per_channel", block_size=(128, 128))
    with pytest.raises(ValueError, match="block_size must be two ints"):
        Fp8Scheme("block", block_size=(128, 0))
