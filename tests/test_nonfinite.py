"""Non-finite inputs: a NaN stays in its own element and token, ±Inf saturates, no scale is poisoned.

A property test over random shapes, input dtypes, fp8 dtypes, activation schemes and every path
(the XLA formulas, `scaled_fp8_quant`, the op, the Hopper and TPU kernels in interpret mode): the
codes and scales equal the float64 reference's (which takes the amax over the finite values), and
the rows without a non-finite value quantize and multiply exactly as they do when the non-finite
values are replaced by zeros.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests import reference
from w8a8_jax import Fp8LinearOp, quantization, scaled_fp8_quant
from w8a8_jax.kernels.gpu import quant as gpu_quant
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.tpu import BlockSizes, fused_quant_scaled_mm
from w8a8_jax.kernels.tpu import per_token_quant as tpu_per_token_quant

CASES = 12
SCHEMES = ("static", "dynamic_per_tensor", "dynamic_per_token", "dynamic_per_token_ub")
FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e4m3fnuz)
X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def poisoned(rng, m, k, x_dtype):
    """`(x (M, K) x_dtype, bad_rows)`: normal rows at random scales, and in a random third of the
    rows (at least one, never all) one to three NaN, +Inf or -Inf entries."""
    x = rng.normal(size=(m, k)) * np.exp(rng.uniform(-3, 3, size=(m, 1)))
    bad_rows = rng.choice(m, size=max(1, m // 3), replace=False) if m > 1 else np.array([], int)
    for row in bad_rows:
        for col in rng.choice(k, size=min(k, rng.integers(1, 4)), replace=False):
            x[row, col] = rng.choice([np.nan, np.inf, -np.inf])
    return jnp.asarray(x.astype(np.float32)).astype(x_dtype), np.sort(bad_rows)


def zeroed(x):
    """`x` with its non-finite entries set to 0 (the input whose clean rows must behave the same)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def check_codes(q, scale, x, fp8_dtype):
    """Codes: NaN exactly where x is NaN, ±max where x is ±Inf; every scale finite and > 0."""
    x = np.asarray(x, np.float32)
    codes = np.asarray(q).astype(np.float32)
    bound = reference.FP8_MAX[np.dtype(fp8_dtype)]
    np.testing.assert_array_equal(np.isnan(codes), np.isnan(x))
    np.testing.assert_array_equal(codes[np.isposinf(x)], bound)
    np.testing.assert_array_equal(codes[np.isneginf(x)], -bound)
    scale = np.asarray(scale)
    assert np.isfinite(scale).all() and (scale > 0).all(), scale


def reference_quant(x, scheme, fp8_dtype, input_scale, scale_ub):
    if scheme == "static":
        return reference.quant_static(x, input_scale, fp8_dtype), np.asarray(input_scale, np.float32).reshape(1)
    if scheme == "dynamic_per_tensor":
        return reference.quant_dynamic_per_tensor(x, fp8_dtype)
    return reference.quant_dynamic_per_token(x, scale_ub, fp8_dtype)


def draw(rng):
    m = int(rng.integers(1, 40))
    k = int(rng.choice([1, 7, 64, 130, 256]))
    return m, k, X_DTYPES[rng.integers(3)], FP8_DTYPES[rng.integers(2)], SCHEMES[rng.integers(4)]


def scheme_arguments(scheme, rng):
    input_scale = jnp.asarray([rng.uniform(0.001, 0.05)], jnp.float32) if scheme == "static" else None
    scale_ub = jnp.asarray([rng.uniform(0.5, 3.0)], jnp.float32) if scheme.endswith("_ub") else None
    return input_scale, scale_ub


@pytest.mark.parametrize("seed", range(CASES))
def test_quantizers(seed):
    """`quantize_activation` and `scaled_fp8_quant` on random poisoned inputs of every scheme."""
    rng = np.random.default_rng(seed)
    m, k, x_dtype, fp8_dtype, scheme = draw(rng)
    x, bad_rows = poisoned(rng, m, k, x_dtype)
    input_scale, scale_ub = scheme_arguments(scheme, rng)
    activation = scheme.removesuffix("_ub")
    q, scale = quantization.quantize_activation(
        x, activation, input_scale=input_scale, scale_ub=scale_ub, fp8_dtype=fp8_dtype
    )
    check_codes(q, scale, x, fp8_dtype)
    ref_q, ref_scale = reference_quant(x, activation, fp8_dtype, input_scale, scale_ub)
    reference.assert_codes_identical(q, ref_q)
    reference.assert_bit_identical(scale, ref_scale)
    clean_q, clean_scale = quantization.quantize_activation(
        zeroed(x), activation, input_scale=input_scale, scale_ub=scale_ub, fp8_dtype=fp8_dtype
    )
    clean = np.setdiff1d(np.arange(m), bad_rows)
    reference.assert_bit_identical(np.asarray(q)[clean], np.asarray(clean_q)[clean])
    if activation == "dynamic_per_token":
        reference.assert_bit_identical(np.asarray(scale)[clean], np.asarray(clean_scale)[clean])
    else:
        reference.assert_bit_identical(scale, clean_scale)
    public_q, public_scale = scaled_fp8_quant(
        x,
        input_scale,
        scale_ub=scale_ub,
        use_per_token_if_dynamic=activation == "dynamic_per_token",
        fp8_dtype=fp8_dtype,
    )
    reference.assert_codes_identical(public_q, q)
    reference.assert_bit_identical(public_scale, scale)


@pytest.mark.parametrize("seed", range(CASES))
def test_op_outputs(seed):
    """`Fp8LinearOp.apply`: rows holding a NaN are NaN, every other row (Inf rows included) is
    finite and the rows without non-finite input equal those of the zeroed input, bit for bit."""
    rng = np.random.default_rng(100 + seed)
    m, k, x_dtype, fp8_dtype, scheme = draw(rng)
    n = int(rng.integers(1, 24))
    x, bad_rows = poisoned(rng, m, k, x_dtype)
    input_scale, scale_ub = scheme_arguments(scheme, rng)
    weight, weight_scale = quantization.quantize_weight(
        jnp.asarray(rng.normal(size=(n, k)), jnp.float32), ["per_tensor", "per_channel"][seed % 2], fp8_dtype
    )
    op = Fp8LinearOp(use_per_token_if_dynamic=scheme.startswith("dynamic_per_token"))
    apply = functools.partial(op.apply, weight=weight, weight_scale=weight_scale, input_scale=input_scale)
    if scale_ub is not None:
        apply = functools.partial(apply, input_scale_ub=scale_ub)
    out = np.asarray(apply(x), np.float32)
    nan_rows = np.isnan(np.asarray(x, np.float32)).any(axis=1)
    assert np.isnan(out[nan_rows]).all() and np.isfinite(out[~nan_rows]).all()
    clean = np.setdiff1d(np.arange(m), bad_rows)
    reference.assert_bit_identical(out[clean], np.asarray(apply(zeroed(x)), np.float32)[clean])


@pytest.mark.parametrize("per_token", [False, True])
def test_op_at_a_serving_shape(per_token):
    """A shape the Hopper kernels take (K, N multiples of 256; on the H200 the plan runs the quant
    kernel and the GEMM its table picks): NaN rows NaN, other rows finite, clean rows unchanged."""
    rng = np.random.default_rng(7)
    x, bad_rows = poisoned(rng, 64, 4096, jnp.bfloat16)
    weight, weight_scale = quantization.quantize_weight(
        jnp.asarray(rng.normal(size=(1024, 4096)), jnp.float32), "per_channel", jnp.float8_e4m3fn
    )
    op = Fp8LinearOp(use_per_token_if_dynamic=per_token)
    out = np.asarray(op.apply(x, weight, weight_scale), np.float32)
    nan_rows = np.isnan(np.asarray(x, np.float32)).any(axis=1)
    plan = op.plan(x, weight, weight_scale)
    assert np.isnan(out[nan_rows]).all() and np.isfinite(out[~nan_rows]).all(), plan
    clean = np.setdiff1d(np.arange(64), bad_rows)
    reference.assert_bit_identical(out[clean], np.asarray(op.apply(zeroed(x), weight, weight_scale), np.float32)[clean])


@pytest.mark.parametrize("seed", range(4))
def test_hopper_kernels_interpret(seed):
    """The Hopper per-token quant kernel and GEMM in Mosaic GPU interpret mode (the H200 runs the
    same test compiled: `tests/kernels/gpu`)."""
    rng = np.random.default_rng(200 + seed)
    m, k = int(rng.integers(1, 12)), 256 * int(rng.integers(1, 3))
    x, bad_rows = poisoned(rng, m, k, X_DTYPES[seed % 3])
    scale_ub = jnp.asarray([2.0], jnp.float32) if seed % 2 else None
    q, scale = gpu_quant.per_token_quant(x, scale_ub, jnp.float8_e4m3fn, interpret=True)
    check_codes(q, scale, x, jnp.float8_e4m3fn)
    ref_q, ref_scale = reference.quant_dynamic_per_token(x, scale_ub)
    reference.assert_codes_identical(q, ref_q)
    reference.assert_bit_identical(scale, ref_scale)
    weight, weight_scale = quantization.quantize_weight(
        jnp.asarray(rng.normal(size=(256, k)), jnp.float32), "per_channel", jnp.float8_e4m3fn
    )
    out = np.asarray(gpu_mm.scaled_mm(q, weight, scale, weight_scale, None, jnp.float32, interpret=True))
    nan_rows = np.isnan(np.asarray(x, np.float32)).any(axis=1)
    assert np.isnan(out[nan_rows]).all() and np.isfinite(out[~nan_rows]).all()
    clean = np.setdiff1d(np.arange(m), bad_rows)
    ref = reference.scaled_mm(ref_q, weight, ref_scale, weight_scale)
    reference.assert_gemm_close(out[clean], ref[clean], k, jnp.float32)


@pytest.mark.parametrize("seed", range(4))
def test_tpu_kernels_interpret(seed):
    """The TPU per-token quant kernel and the GEMM that quantizes its rows in-kernel, interpret mode."""
    from tests.kernels.tpu.conftest import INTERPRET

    rng = np.random.default_rng(300 + seed)
    m, k, n = int(rng.integers(1, 40)), 256, 128
    fp8_dtype = FP8_DTYPES[seed % 2]
    x, bad_rows = poisoned(rng, m, k, X_DTYPES[seed % 3])
    scale_ub = jnp.asarray([2.0], jnp.float32) if seed % 2 else None
    with jax.default_device(jax.devices("cpu")[0]):
        q, scale = tpu_per_token_quant(x, scale_ub, fp8_dtype, interpret=INTERPRET)
        check_codes(q, scale, x, fp8_dtype)
        ref_q, ref_scale = reference.quant_dynamic_per_token(x, scale_ub, fp8_dtype)
        reference.assert_codes_identical(q, ref_q)
        reference.assert_bit_identical(scale, ref_scale)
        weight, weight_scale = quantization.quantize_weight(
            jnp.asarray(rng.normal(size=(n, k)), jnp.float32), "per_channel", fp8_dtype
        )
        out = fused_quant_scaled_mm(
            x,
            weight,
            weight_scale,
            scale_ub=scale_ub,
            out_dtype=jnp.float32,
            blocks=BlockSizes(32, 128, 256),
            interpret=INTERPRET,
        )
    out = np.asarray(out)
    nan_rows = np.isnan(np.asarray(x, np.float32)).any(axis=1)
    assert np.isnan(out[nan_rows]).all() and np.isfinite(out[~nan_rows]).all()
    clean = np.setdiff1d(np.arange(m), bad_rows)
    ref = reference.scaled_mm(ref_q, weight, ref_scale, weight_scale)
    reference.assert_gemm_close(out[clean], ref[clean], k, jnp.float32)


def test_true_divide_of_infinities():
    """`true_divide` is IEEE division also for ±Inf and NaN numerators (no `0 * inf` in the divisor)."""
    numerator = jnp.asarray([np.inf, -np.inf, np.nan, 3.0], jnp.float32)
    got = np.asarray(quantization.true_divide(numerator, jnp.float32(2.0)))
    np.testing.assert_array_equal(got, np.asarray([np.inf, -np.inf, np.nan, 1.5], np.float32))


def test_all_non_finite_rows_get_the_floor_scale():
    x = jnp.asarray([[np.nan, np.inf], [1.0, -2.0]], jnp.float32)
    q, scale = quantization.quantize_per_token(x, None, jnp.float8_e4m3fn)
    assert float(scale[0, 0]) == pytest.approx(1 / (448 * 512)) and float(scale[1, 0]) == pytest.approx(2 / 448)
    q, scale = quantization.quantize_dynamic_per_tensor(jnp.full((2, 3), np.nan, jnp.float32), jnp.float8_e4m3fn)
    assert float(scale[0]) == pytest.approx(1 / (448 * 512)) and np.isnan(np.asarray(q, np.float32)).all()
    assert ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max == 448


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_empty_inputs(per_token, static):
    """No rows (and rows of no features) quantize to empty codes; the per-tensor scale is the floor."""
    for shape in ((0, 16), (3, 0)):
        q, scale = scaled_fp8_quant(
            jnp.ones(shape), jnp.array([0.5]) if static else None, use_per_token_if_dynamic=per_token
        )
        rows = shape[0] if per_token and not static else 1
        assert q.shape == shape and scale.shape == ((rows, 1) if per_token and not static else (1,))
        assert np.isfinite(np.asarray(scale)).all() and (np.asarray(scale) > 0).all()
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) with N, K >= 1"):
        quantization.quantize_weight(jnp.ones((0, 16)), "per_tensor", jnp.float8_e4m3fn)
