"""FP8 dtypes and the constants of vLLM's quantization formulas for each."""

import jax.numpy as jnp
import numpy as np

FP8_E4M3FN = jnp.float8_e4m3fn
FP8_E4M3FNUZ = jnp.float8_e4m3fnuz
FP8_DTYPES = (np.dtype(FP8_E4M3FN), np.dtype(FP8_E4M3FNUZ))

# Inputs the quantizers accept and outputs the GEMM paths produce.
FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))

# The largest magnitude a quantizer produces. e4m3fn's true max is 448. For e4m3fnuz
# (max 240) vLLM uses 224 because 240 hurt dynamic-quantization accuracy; we follow it.
_QUANT_MAX = {np.dtype(FP8_E4M3FN): 448.0, np.dtype(FP8_E4M3FNUZ): 224.0}


def is_fp8(dtype) -> bool:
    """Whether `dtype` is one of the supported fp8 types (e4m3fn, e4m3fnuz)."""
    return np.dtype(dtype) in FP8_DTYPES


def fp8_max(dtype) -> float:
    """The clamp bound used when quantizing to `dtype` (448 for e4m3fn, 224 for e4m3fnuz)."""
    try:
        return _QUANT_MAX[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"expected an fp8 dtype (float8_e4m3fn or float8_e4m3fnuz), got {dtype}") from None


def min_scaling_factor(dtype) -> float:
    """Lower bound of a per-token scale, `1 / (fp8_max * 512)`, as in vLLM's kernels."""
    return 1.0 / (fp8_max(dtype) * 512.0)
