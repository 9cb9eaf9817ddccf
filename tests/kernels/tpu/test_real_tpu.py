"""Compiled (Mosaic) runs on a real TPU: what interpret mode cannot check. Skipped off TPU.

Interpret mode runs the kernels' numerics on CPU; it does not lower them with Mosaic, so it does
not prove that each op (fp8 casts, fp8 dot on v7, f32 division, (tm, 1) blocks) compiles on a
given generation, that the VMEM estimate holds, or that TPU division gives the same bits as CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.kernels.tpu.conftest import requires_tpu
from tests.kernels.tpu.test_scaled_mm import make_operands
from w8a8_jax import platform, quantization
from w8a8_jax.kernels import tpu

pytestmark = requires_tpu


@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (70, 300, 260), (512, 4096, 14336), (2048, 14336, 4096)])
@pytest.mark.parametrize("per_token, per_channel", [(False, False), (True, True)])
def test_compiled_gemm(key, m, k, n, per_token, per_channel):
    qinput, weight, scale_a, scale_b, bias = make_operands(
        key, m, k, n, per_token=per_token, per_channel=per_channel, with_bias=True
    )
    out = tpu.w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.bfloat16)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), k, jnp.bfloat16)


def test_compiled_quant_matches_xla_on_tpu(key):
    """TPU division inside Mosaic and in XLA must give the same codes as the NumPy reference."""
    x = (jax.random.normal(key, (256, 4096)) * 3).astype(jnp.bfloat16)
    q, scale = tpu.per_token_quant(x, None, jnp.float8_e4m3fn)
    ref_q, ref_scale = reference.quant_dynamic_per_token(x)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), ref_q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    xla_q, _ = quantization.quantize_per_token(x, None, jnp.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(xla_q).view(np.uint8))


@pytest.mark.parametrize("static", [False, True])
def test_compiled_fused_quant_gemm(key, static):
    ks = jax.random.split(key, 2)
    x = (jax.random.normal(ks[0], (128, 4096)) * 3).astype(jnp.bfloat16)
    _, weight, _, weight_scale, bias = make_operands(
        ks[1], 128, 4096, 4096, per_token=False, per_channel=True, with_bias=True
    )
    input_scale = jnp.array([0.02], jnp.float32) if static else None
    out = tpu.fused_quant_scaled_mm(x, weight, weight_scale, input_scale=input_scale, bias=bias)
    codes, x_scale = (
        (reference.quant_static(x, input_scale), np.asarray(input_scale))
        if static
        else (reference.quant_dynamic_per_token(x))
    )
    reference.assert_gemm_close(
        out, reference.scaled_mm(codes, weight, x_scale, weight_scale, bias), 4096, jnp.bfloat16
    )


def test_dispatch_uses_tpu_kernel_without_override():
    kernel = platform.fused_kernel()
    assert kernel is not None and kernel.scaled_mm.func is tpu.w8a8_scaled_mm
