"""The TPU per-token quant kernel in interpret mode: codes and scales bit-identical to the references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import exactness
from tests.kernels.tpu.conftest import INTERPRET
from w8a8_jax.kernels.tpu import per_token_quant


def check_quant(x, scale_ub=None, fp8_dtype=jnp.float8_e4m3fn):
    """Exact against the NumPy reference and the foundation's XLA `quantize_per_token`."""
    q, scale = per_token_quant(x, scale_ub, fp8_dtype, interpret=INTERPRET)
    exactness.assert_per_token_exact(q, scale, x, scale_ub, fp8_dtype)
    assert np.isfinite(np.asarray(q, np.float32)).all() and np.isfinite(np.asarray(scale)).all()
    assert (np.asarray(scale) > 0).all()
    return q, scale


@pytest.mark.parametrize(
    "m, k, x_dtype",
    [(17, 300, jnp.bfloat16), (64, 256, jnp.float16), (70, 1025, jnp.float32), (1, 128, jnp.bfloat16)],
)
def test_per_token_quant_exact(key, m, k, x_dtype):
    # Magnitudes spread over 6 decades so that rows hit rounding ties and the min-scale floor.
    ks = jax.random.split(key, 2)
    row_scale = 10.0 ** jax.random.uniform(ks[0], (m, 1), minval=-4, maxval=2)
    check_quant((jax.random.normal(ks[1], (m, k)) * row_scale).astype(x_dtype))


def test_scale_ub_and_e4m3fnuz(key):
    x = (jax.random.normal(key, (40, 256)) * 8).astype(jnp.bfloat16)
    check_quant(x, scale_ub=jnp.array([5.0], jnp.float32))
    check_quant(x, fp8_dtype=jnp.float8_e4m3fnuz)


def test_nan_safety():
    """Zero rows, padding rows (M=35 -> 64), max-magnitude and tiny rows: all finite, exact."""
    rows = np.zeros((35, 256), np.float32)
    rows[1] = np.finfo(np.float32).max * np.sign(np.arange(256) - 127.5)  # max magnitude
    rows[2] = np.finfo(np.float32).tiny  # tiny: below the floor scale, codes 0
    rows[3, ::7] = -1e-30
    rows[4] = np.linspace(-1.0, 1.0, 256)
    q, scale = check_quant(jnp.asarray(rows))
    assert not np.asarray(q[0], np.float32).any() and float(scale[0, 0]) == pytest.approx(1 / (448 * 512))
    assert np.abs(np.asarray(q[1], np.float32)).max() == 448
    check_quant(jnp.zeros((33, 128), jnp.bfloat16))  # all-zero
    check_quant(jnp.full((32, 128), jnp.finfo(jnp.bfloat16).max, jnp.bfloat16))


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        per_token_quant(jnp.ones((4, 128), jnp.int32), None, jnp.float8_e4m3fn, interpret=INTERPRET)
    with pytest.raises(ValueError, match="scale_ub must have shape"):
        per_token_quant(jnp.ones((4, 128)), jnp.ones((2,)), jnp.float8_e4m3fn, interpret=INTERPRET)
    with pytest.raises(ValueError, match="per-token quant of rows of K=4000000 needs about"):
        per_token_quant(jax.ShapeDtypeStruct((4, 4_000_000), jnp.float32), None, jnp.float8_e4m3fn, interpret=INTERPRET)
