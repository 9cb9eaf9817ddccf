"""The Hopper per-token quant kernel: codes and scales bit-identical to the float64 NumPy reference
and to the XLA formula, in Mosaic GPU interpret mode on CPU and compiled on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import exactness
from w8a8_jax import dispatch, quantization
from w8a8_jax.kernels.gpu import quant, supports_device

on_hopper = jax.devices()[0].platform == "gpu" and supports_device(jax.devices()[0])


def check_quant(x, scale_ub=None, fp8_dtype=jnp.float8_e4m3fn, *, interpret=True, rows_per_block=1):
    q, scale = quant.per_token_quant(x, scale_ub, fp8_dtype, interpret=interpret, rows_per_block=rows_per_block)
    exactness.assert_per_token_exact(q, scale, x, scale_ub, fp8_dtype)
    return q, scale


def spread_rows(key, m, k, dtype):
    """Rows whose magnitudes span 6 decades, so rows hit rounding ties and the min-scale floor."""
    ks = jax.random.split(key, 2)
    row_scale = 10.0 ** jax.random.uniform(ks[0], (m, 1), minval=-4, maxval=2)
    return (jax.random.normal(ks[1], (m, k)) * row_scale).astype(dtype)


@pytest.mark.parametrize(
    "m, k, x_dtype, rows_per_block",
    [
        (17, 2048, jnp.bfloat16, 1),  # one 16-byte vector a thread
        (9, 5120, jnp.float32, 2),  # several chunks a row; M not a multiple of the block
        (6, 768, jnp.float16, 4),  # 2-element vectors (768 = 128 * 6)
        (3, 12288, jnp.bfloat16, 1),  # three 4096-element chunks: amax over re-read chunks
    ],
)
def test_interpret_exact(key, m, k, x_dtype, rows_per_block):
    assert quant.supports(k, x_dtype, jnp.float8_e4m3fn)
    check_quant(spread_rows(key, m, k, x_dtype), rows_per_block=rows_per_block)


def test_interpret_scale_ub(key):
    x = (jax.random.normal(key, (5, 1024)) * 8).astype(jnp.bfloat16)
    _, scale = check_quant(x, scale_ub=jnp.array([5.0], jnp.float32))
    assert float(scale.max()) == pytest.approx(5.0 / 448)


def test_interpret_nan_safety():
    """Zero, max-magnitude and tiny rows: finite codes and scales, exact."""
    rows = np.zeros((4, 256), np.float32)
    rows[1] = np.finfo(np.float32).max * np.sign(np.arange(256) - 127.5)
    rows[2] = np.finfo(np.float32).tiny
    rows[3, ::7] = -1e-30
    q, scale = check_quant(jnp.asarray(rows))
    assert np.isfinite(np.asarray(q, np.float32)).all() and (np.asarray(scale) > 0).all()
    assert np.abs(np.asarray(q[1], np.float32)).max() == 448


@pytest.mark.parametrize(
    "k, x_dtype, fp8_dtype",
    [(300, jnp.bfloat16, jnp.float8_e4m3fn), (1024, jnp.bfloat16, jnp.float8_e4m3fnuz)],
)
def test_plan_sends_unsupported_rows_to_xla(key, k, x_dtype, fp8_dtype):
    """Rows the kernel does not take (K not a multiple of 256, e4m3fnuz) get the XLA formula from
    the plan, and the kernel itself refuses them."""
    from w8a8_jax.kernels import gpu

    assert not quant.supports(k, x_dtype, fp8_dtype)
    name, _ = dispatch.choose_quantizer("dynamic_per_token", k, x_dtype, fp8_dtype, gpu.FUSED_KERNEL)
    assert name == "quantize_per_token"
    assert dispatch.choose_quantizer("dynamic_per_token", 1024, x_dtype, jnp.float8_e4m3fn, gpu.FUSED_KERNEL)[0] == (
        "kernel.per_token_quant"
    )
    with pytest.raises(ValueError, match="per-token quant kernel takes"):
        quant.per_token_quant(spread_rows(key, 3, k, x_dtype), None, fp8_dtype, interpret=True)


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        quant.per_token_quant(jnp.ones((4, 256), jnp.int32), None, jnp.float8_e4m3fn, interpret=True)
    with pytest.raises(ValueError, match="x must be 2-D"):
        quant.per_token_quant(jnp.ones((256,)), None, jnp.float8_e4m3fn, interpret=True)
    with pytest.raises(ValueError, match="scale_ub must have shape"):
        quant.per_token_quant(jnp.ones((4, 256)), jnp.ones((2,)), jnp.float8_e4m3fn, interpret=True)
    with pytest.raises(TypeError, match="fp8_dtype"):
        quant.per_token_quant(jnp.ones((4, 256)), None, jnp.int8, interpret=True)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize(
    "m, k, x_dtype, rows_per_block",
    [
        (1, 4096, jnp.bfloat16, 1),
        (77, 4096, jnp.bfloat16, 2),
        (1024, 8192, jnp.bfloat16, 1),
        (64, 28672, jnp.bfloat16, 1),
        (100, 1024, jnp.float32, 4),
        (64, 2048, jnp.float16, 1),
    ],
)
def test_hopper_exact(key, m, k, x_dtype, rows_per_block):
    check_quant(spread_rows(key, m, k, x_dtype), interpret=False, rows_per_block=rows_per_block)


def poisoned_rows(key, m, k, dtype):
    """`spread_rows` with NaN, +Inf and -Inf in rows 0, 2 and 3 (and all three in row 5)."""
    x = np.array(spread_rows(key, m, k, jnp.float32))
    x[0, 7], x[2, k - 1], x[3, k // 2] = np.nan, np.inf, -np.inf
    x[5, 1:4] = (np.nan, np.inf, -np.inf)
    return jnp.asarray(x).astype(dtype)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_interpret_non_finite_stays_in_its_element(key, x_dtype):
    """NaN -> a NaN code, ±Inf -> ±448, scales from the finite values (the other rows untouched)."""
    x = poisoned_rows(key, 8, 1024, x_dtype)
    q, scale = check_quant(x, scale_ub=jnp.array([3.0], jnp.float32) if x_dtype == jnp.float32 else None)
    codes = np.asarray(q, np.float32)
    assert np.isnan(codes[0, 7]) and codes[2, -1] == 448 and codes[3, 512] == -448 and np.isfinite(scale).all()
    assert np.isnan(codes).sum() == 2


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("m, k, x_dtype", [(8, 4096, jnp.bfloat16), (77, 12288, jnp.float32), (6, 768, jnp.float16)])
def test_hopper_non_finite_stays_in_its_element(key, m, k, x_dtype):
    q, scale = check_quant(poisoned_rows(key, m, k, x_dtype), interpret=False)
    assert np.isnan(np.asarray(q, np.float32)).sum() == 2 and np.isfinite(np.asarray(scale)).all()


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
def test_hopper_scale_ub_and_dispatch(key):
    """`scaled_fp8_quant` takes the registered kernel on Hopper; scale_ub applies."""
    from w8a8_jax import platform

    assert platform.fused_kernel().per_token_quant is quant.per_token_quant
    x = spread_rows(key, 33, 4096, jnp.bfloat16)
    ub = jnp.array([0.5], jnp.float32)
    q, scale = quantization.scaled_fp8_quant(x, scale_ub=ub, use_per_token_if_dynamic=True)
    exactness.assert_per_token_exact(q, scale, x, ub, jnp.float8_e4m3fn)
