"""What made tpu-inference's quantized matmul emit NaNs, through the TPU GEMM and fused quant.

Every case is finite input whose exact result is representable in the output dtype; nothing
non-finite may come out, and the result must still match the float64 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.kernels.tpu.conftest import INTERPRET
from tests.kernels.tpu.test_scaled_mm import SMALL, make_operands
from w8a8_jax.kernels.tpu import BlockSizes, fused_quant_scaled_mm, w8a8_scaled_mm


def check_finite_and_close(out, ref, k, out_dtype):
    assert np.isfinite(np.asarray(out, np.float64)).all(), "non-finite output from finite input"
    reference.assert_gemm_close(out, ref, k, out_dtype)


@pytest.mark.parametrize("case", ["zero_rows", "all_zero", "max_magnitude", "tiny_scales"])
def test_gemm(key, case):
    m, k, n = 35, 256, 130  # 35 rows: 29 padding rows in the second row block
    qinput, weight, scale_a, scale_b, bias = make_operands(
        key, m, k, n, per_token=True, per_channel=True, with_bias=True
    )
    out_dtype = jnp.float32
    if case == "zero_rows":
        qinput = qinput.at[::3].set(0)
    elif case == "all_zero":
        qinput, weight = jnp.zeros_like(qinput), jnp.zeros_like(weight)
    elif case == "max_magnitude":
        # Every product 448 * 448 (sign alternating per row): |acc| up to K * 2^17.6; scales keep
        # the result within bf16 range.
        qinput = jnp.full((m, k), 448, jnp.float32).astype(jnp.float8_e4m3fn)
        weight = (jnp.where(jnp.arange(n)[:, None] % 2 == 0, 448.0, -448.0) * jnp.ones((n, k))).astype(
            jnp.float8_e4m3fn
        )
        out_dtype = jnp.bfloat16
    elif case == "tiny_scales":
        # scale_a * scale_b = 1e-40 flushes to zero or subnormal in float32; the output is then bias.
        scale_a = jnp.full_like(scale_a, 1e-20)
        scale_b = jnp.full_like(scale_b, 1e-20)
    out = w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype, blocks=SMALL, interpret=INTERPRET)
    check_finite_and_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), k, out_dtype)


@pytest.mark.parametrize("case", ["zero_rows_and_padding", "all_zero", "max_magnitude_and_tiny"])
def test_in_kernel_per_token_quant(key, case):
    m, k, n = 35, 256, 256
    _, weight, _, weight_scale, bias = make_operands(key, m, k, n, per_token=False, per_channel=True, with_bias=True)
    x = jax.random.normal(key, (m, k), jnp.float32)
    if case == "zero_rows_and_padding":
        x = x.at[::2].set(0)
    elif case == "all_zero":
        x = jnp.zeros_like(x)
    else:
        # Row 0 huge: scale 2.2e27, acc * scale_a up to 5e7 * 2.2e27, within float32 (the epilogue
        # multiplies acc by scale_a, then scale_b, as the XLA paths do; test_quant covers float32 max).
        x = x.at[0].set(1e30).at[1].set(np.finfo(np.float32).tiny).at[2].set(-1e-30)
    codes, x_scale = reference.quant_dynamic_per_token(x)
    out = fused_quant_scaled_mm(
        x, weight, weight_scale, bias=bias, out_dtype=jnp.float32, blocks=BlockSizes(32, 128, 256), interpret=INTERPRET
    )
    check_finite_and_close(out, reference.scaled_mm(codes, weight, x_scale, weight_scale, bias), k, jnp.float32)
