"""Checks the kernel tests share: a kernel's codes against the reference and the library's formula."""

from tests import reference
from w8a8_jax import quantization


def assert_per_token_exact(q, scale, x, scale_ub, fp8_dtype) -> None:
    """A per-token quantizer's `(q, scale)` for `x` is bit-identical to this module's float64
    reference and to the library's XLA formula (`quantization.quantize_per_token`)."""
    ref_q, ref_scale = reference.quant_dynamic_per_token(x, scale_ub, fp8_dtype)
    xla_q, xla_scale = quantization.quantize_per_token(x, scale_ub, fp8_dtype)
    reference.assert_codes_identical(q, ref_q)
    reference.assert_bit_identical(scale, ref_scale)
    reference.assert_codes_identical(q, xla_q)
    reference.assert_bit_identical(scale, xla_scale)
