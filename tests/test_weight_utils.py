"""Weight utilities against NumPy: fused-shard requantization, channelwise scales, e4m3fnuz."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests import reference
from w8a8_jax import (
    all_close_1d,
    convert_to_channelwise,
    normalize_e4m3fn_to_e4m3fnuz,
    per_tensor_dequantize,
    requantize_with_max_scale,
)

WIDTHS = [48, 16, 16]  # a fused QKV with grouped K/V heads


def fused_weight(key, widths, k=64):
    """Codes of three shards, each quantized with its own per-tensor scale."""
    k1, k2 = jax.random.split(key)
    scales = np.asarray(jax.random.uniform(k1, (len(widths),), minval=0.5, maxval=4.0), np.float32) * 1e-3
    codes = reference.fp8_cast(np.asarray(jax.random.normal(k2, (sum(widths), k))) * 100, jnp.float8_e4m3fn)
    return jnp.asarray(codes), jnp.asarray(scales)


def test_requantize_with_max_scale(key):
    weight, scales = fused_weight(key, WIDTHS)
    max_scale, requantized = requantize_with_max_scale(weight, scales, WIDTHS)
    assert float(max_scale) == scales.max()
    # Reference: dequantize each shard in float32 with its scale, quantize with the max scale.
    shard_scale = np.repeat(np.asarray(scales), WIDTHS)[:, None]
    dequantized = np.asarray(weight, np.float32) * shard_scale
    expected = reference.quant_static(dequantized, scales.max())
    np.testing.assert_array_equal(np.asarray(requantized).view(np.uint8), expected.view(np.uint8))
    # The dequantized values survive to within one fp8 rounding (relative 2^-4).
    err = np.abs(np.asarray(requantized, np.float64) * float(max_scale) - dequantized)
    assert np.all(err <= 2**-4 * np.abs(dequantized) + 2**-9 * float(max_scale))


def test_requantize_skips_checkpoint_with_one_scale(key):
    weight, scales = fused_weight(key, WIDTHS)
    unloaded = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).min)
    scales = scales.at[1:].set(unloaded)  # only the fused module's single scale was loaded
    max_scale, out = requantize_with_max_scale(weight, scales, WIDTHS)
    assert float(max_scale) == float(scales[0])
    np.testing.assert_array_equal(np.asarray(out).view(np.uint8), np.asarray(weight).view(np.uint8))


def test_requantize_under_jit(key):
    weight, scales = fused_weight(key, WIDTHS)
    eager = requantize_with_max_scale(weight, scales, WIDTHS)
    jitted = jax.jit(requantize_with_max_scale, static_argnums=2)(weight, scales, tuple(WIDTHS))
    np.testing.assert_array_equal(np.asarray(eager[1]).view(np.uint8), np.asarray(jitted[1]).view(np.uint8))


def test_convert_to_channelwise(key):
    _, scales = fused_weight(key, WIDTHS)
    channelwise = convert_to_channelwise(scales, WIDTHS)
    assert channelwise.shape == (80, 1) and channelwise.dtype == jnp.float32
    np.testing.assert_array_equal(channelwise[:, 0], np.repeat(np.asarray(scales), WIDTHS))


def test_normalize_e4m3fn_to_e4m3fnuz(key):
    weight, _ = fused_weight(key, [32])
    weight = weight.at[0, :4].set(-0.0)  # bit pattern 0x80: NaN in e4m3fnuz unless rewritten
    scale, input_scale = jnp.array([0.01]), jnp.array([0.2])
    out, out_scale, out_input_scale = normalize_e4m3fn_to_e4m3fnuz(weight, scale, input_scale)
    assert out.dtype == jnp.float8_e4m3fnuz
    values = np.asarray(out, np.float64) * np.asarray(out_scale, np.float64)
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values, np.asarray(weight, np.float64) * np.float64(np.float32(0.01)))
    np.testing.assert_allclose(out_input_scale, [0.4])
    assert normalize_e4m3fn_to_e4m3fnuz(weight, scale)[2] is None


def test_per_tensor_dequantize(key):
    weight, _ = fused_weight(key, [16])
    np.testing.assert_array_equal(per_tensor_dequantize(weight, 0.5), np.asarray(weight, np.float32) * 0.5)
    assert per_tensor_dequantize(weight, 0.5, dtype=jnp.float16).dtype == jnp.float16


def test_all_close_1d():
    assert all_close_1d(np.array([1.0, 1.0 + 1e-7, 1.0]))
    assert not all_close_1d(np.array([1.0, 1.01]))
    with pytest.raises(ValueError, match="1-D"):
        all_close_1d(np.ones((2, 2)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda w, s: requantize_with_max_scale(w, s[:2], WIDTHS), ValueError, "one scale per shard"),
        (lambda w, s: requantize_with_max_scale(w, s, [48, 16]), ValueError, "must sum to weight's 80 rows"),
        (lambda w, s: requantize_with_max_scale(w.astype(jnp.float32), s, WIDTHS), TypeError, "weight must be float8"),
        (lambda w, s: convert_to_channelwise(s[:1], WIDTHS), ValueError, "one scale per shard"),
        (lambda w, s: normalize_e4m3fn_to_e4m3fnuz(w.astype(jnp.float8_e4m3fnuz), s), TypeError, "float8_e4m3fn"),
        (lambda w, s: requantize_with_max_scale(w, s, [96, -16, 0]), ValueError, "logical_widths must be positive"),
        (lambda w, s: convert_to_channelwise(s, [48, -8, 40]), ValueError, "logical_widths must be positive"),
        (lambda w, s: requantize_with_max_scale(w, s.at[1].set(jnp.nan), WIDTHS), ValueError, "finite and > 0"),
        (lambda w, s: requantize_with_max_scale(w, s.at[0].set(0.0), WIDTHS), ValueError, "finite and > 0"),
        (lambda w, s: convert_to_channelwise(s.at[2].set(-1.0), WIDTHS), ValueError, "finite and > 0"),
        (lambda w, s: normalize_e4m3fn_to_e4m3fnuz(w[0], s), ValueError, r"weight must be 2-D"),
        (lambda w, s: normalize_e4m3fn_to_e4m3fnuz(w[0, 0], s), ValueError, r"weight must be 2-D"),
        (lambda w, s: normalize_e4m3fn_to_e4m3fnuz(w, s.at[0].set(jnp.inf)), ValueError, "weight_scale must be"),
    ],
)
def test_bad_arguments(key, call, error, match):
    weight, scales = fused_weight(key, WIDTHS)
    with pytest.raises(error, match=match):
        call(weight, scales)
