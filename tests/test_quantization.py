"""scaled_fp8_quant against vLLM's formulas emulated in NumPy: codes bit-identical, scales exact."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests import reference
from w8a8_jax import scaled_fp8_quant

E4M3FN = ml_dtypes.float8_e4m3fn
E4M3FNUZ = ml_dtypes.float8_e4m3fnuz
SHAPES = [(1, 16), (7, 1024), (17, 1025), (33, 5137), (1025, 64)]
DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def _activations(key, shape, dtype, outlier_scale=40.0):
    """Normal activations with a few outlier columns, as real LLM activations have."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, jnp.float32)
    outliers = jax.random.bernoulli(k2, 0.02, (1, shape[1]))
    return (x * jnp.where(outliers, outlier_scale, 1.0)).astype(dtype)


def _bits(x):
    return np.asarray(x).view(np.uint8)


def assert_same_codes(q, ref_q):
    assert q.dtype == ref_q.dtype
    mismatched = np.flatnonzero(_bits(q) != _bits(ref_q))
    assert mismatched.size == 0, f"{mismatched.size} codes differ, first at flat index {mismatched[:5]}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_static(key, shape, dtype):
    x = _activations(key, shape, dtype)
    scale = jnp.array([0.0371], jnp.float32)
    q, s = scaled_fp8_quant(x, scale)
    assert_same_codes(q, reference.quant_static(x, scale))
    np.testing.assert_array_equal(s, np.array([0.0371], np.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_per_tensor(key, shape, dtype):
    x = _activations(key, shape, dtype)
    q, s = scaled_fp8_quant(x)
    ref_q, ref_s = reference.quant_dynamic_per_tensor(x)
    assert s.shape == (1,) and s.dtype == jnp.float32
    np.testing.assert_array_equal(s, ref_s)
    assert_same_codes(q, ref_q)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ub", [False, True])
def test_dynamic_per_token(key, shape, dtype, with_ub):
    x = _activations(key, shape, dtype)
    ub = jnp.array([3.5], jnp.float32) if with_ub else None
    q, s = scaled_fp8_quant(x, scale_ub=ub, use_per_token_if_dynamic=True)
    ref_q, ref_s = reference.quant_dynamic_per_token(x, ub)
    assert s.shape == (shape[0], 1) and s.dtype == jnp.float32
    np.testing.assert_array_equal(s, ref_s)
    assert_same_codes(q, ref_q)
    if with_ub:  # the bound is active: outlier rows saturate instead of stretching the scale
        assert np.all(np.asarray(s) <= 3.5 / 448 + 1e-9)


def test_jit_matches_eager(key):
    x = _activations(key, (33, 1024), jnp.bfloat16)
    for kwargs in [{}, {"use_per_token_if_dynamic": True}, {"scale": jnp.array([0.02])}]:
        eager = scaled_fp8_quant(x, **kwargs)
        jitted = jax.jit(lambda v: scaled_fp8_quant(v, **kwargs))(x)
        assert_same_codes(jitted[0], eager[0])
        np.testing.assert_array_equal(jitted[1], eager[1])


def test_jitted_formulas_match_numpy_at_rounding_ties(key):
    """Jitted, where XLA fuses each formula and may drop a float32 rounding: bit for bit against
    NumPy on a 1024 x 7168 bf16 input, whose codes hit fp8 rounding ties (on the H200 the group
    formula once moved 46 of these 7.3 million codes a step: its float64 scale reached the
    division unrounded, `quantization.true_divide`)."""
    from w8a8_jax import quantization

    x = jax.random.normal(key, (1024, 7168), jnp.float32).astype(jnp.bfloat16)
    per_group = jax.jit(lambda v: quantization.quantize_per_token_group(v, 128, jnp.float8_e4m3fn))
    per_token = jax.jit(lambda v: scaled_fp8_quant(v, use_per_token_if_dynamic=True))
    for (q, s), (ref_q, ref_s) in (
        (per_group(x), reference.quant_per_token_group(x, 128)),
        (per_token(x), reference.quant_dynamic_per_token(x)),
    ):
        np.testing.assert_array_equal(np.asarray(s).reshape(ref_s.shape), ref_s)
        assert_same_codes(q, ref_q)


def test_e4m3fnuz(key):
    x = _activations(key, (17, 1025), jnp.bfloat16)
    q, s = scaled_fp8_quant(x, use_per_token_if_dynamic=True, fp8_dtype=jnp.float8_e4m3fnuz)
    ref_q, ref_s = reference.quant_dynamic_per_token(x, fp8_dtype=E4M3FNUZ)
    np.testing.assert_array_equal(s, ref_s)
    assert_same_codes(q, ref_q)
    assert np.abs(np.asarray(q, np.float32)).max() <= 224  # vLLM's bound for e4m3fnuz


@pytest.mark.parametrize("mode", ["static", "per_tensor", "per_token"])
def test_saturates_never_nan(key, mode):
    x = _activations(key, (9, 256), jnp.float32) * 1e4
    x = x.at[0, 0].set(3e38).at[1, 1].set(-3e38)
    kwargs = {"static": {"scale": jnp.array([1e-3])}, "per_tensor": {}, "per_token": {"use_per_token_if_dynamic": True}}
    q, s = scaled_fp8_quant(x, **kwargs[mode])
    values = np.asarray(q, np.float32)
    assert np.isfinite(values).all() and np.isfinite(np.asarray(s)).all()
    assert values.max() == 448 and values.min() == -448


@pytest.mark.parametrize("per_token", [False, True])
def test_zero_rows_and_all_zero_tensor(key, per_token):
    x = _activations(key, (8, 128), jnp.bfloat16).at[3].set(0)
    q, s = scaled_fp8_quant(x, use_per_token_if_dynamic=per_token)
    assert np.all(np.asarray(q[3], np.float32) == 0)
    assert np.isfinite(np.asarray(s)).all() and np.all(np.asarray(s) > 0)
    zeros = jnp.zeros((4, 128), jnp.bfloat16)
    q, s = scaled_fp8_quant(zeros, use_per_token_if_dynamic=per_token)
    assert np.all(_bits(q) == 0)  # +0 codes, not NaN and not -0
    assert np.isfinite(np.asarray(s)).all() and np.all(np.asarray(s) > 0)


@pytest.mark.parametrize("kwargs", [{}, {"use_per_token_if_dynamic": True}, {"scale": jnp.array([0.05])}])
def test_num_token_padding(key, kwargs):
    x = _activations(key, (5, 64), jnp.bfloat16)
    q, s = scaled_fp8_quant(x, num_token_padding=17, **kwargs)
    q_plain, s_plain = scaled_fp8_quant(x, **kwargs)
    assert q.shape == (17, 64)
    assert_same_codes(q[:5], q_plain)
    assert np.all(_bits(q[5:]) == 0)
    if kwargs.get("use_per_token_if_dynamic"):
        assert s.shape == (17, 1)
        np.testing.assert_array_equal(s[:5], s_plain)
        assert np.all(np.asarray(s[5:]) == 0)
    else:
        assert s.shape == (1,)
    q_short, _ = scaled_fp8_quant(x, num_token_padding=3, **kwargs)  # fewer than M: no padding
    assert q_short.shape == (5, 64)


def test_scalar_static_scale_accepted(key):
    x = _activations(key, (4, 32), jnp.float32)
    q, s = scaled_fp8_quant(x, 0.25)
    assert s.shape == (1,)
    assert_same_codes(q, reference.quant_static(x, 0.25))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scale": jnp.array([0.0])}, ValueError, "scale must be finite and > 0"),
        ({"scale": jnp.array([-1.0])}, ValueError, "scale must be finite and > 0"),
        ({"scale": jnp.array([jnp.inf])}, ValueError, "scale must be finite and > 0"),
        ({"scale": jnp.ones((4, 1))}, ValueError, r"scale must have shape \(1,\)"),
        ({"scale": jnp.array([1], jnp.int32)}, TypeError, "scale must be a float32"),
        ({"scale_ub": jnp.array([1.0])}, ValueError, "scale_ub applies only to dynamic per-token"),
        (
            {"scale": jnp.array([1.0]), "scale_ub": jnp.array([1.0]), "use_per_token_if_dynamic": True},
            ValueError,
            "scale_ub applies only",
        ),
        ({"scale_ub": jnp.array([0.0]), "use_per_token_if_dynamic": True}, ValueError, "scale_ub must be finite"),
        ({"scale_ub": jnp.ones(3), "use_per_token_if_dynamic": True}, ValueError, "scale_ub must have shape"),
        ({"num_token_padding": -1}, ValueError, "num_token_padding"),
        ({"fp8_dtype": jnp.int8}, TypeError, "fp8_dtype"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        scaled_fp8_quant(jnp.ones((4, 16), jnp.float32), **kwargs)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (jnp.ones((2, 3, 16)), ValueError, "input must be 2-D"),
        (jnp.ones((4, 16), jnp.int32), TypeError, "input must be bfloat16, float16 or float32"),
        (jnp.ones((4, 16), jnp.float8_e4m3fn), TypeError, "input must be"),
    ],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        scaled_fp8_quant(x)
