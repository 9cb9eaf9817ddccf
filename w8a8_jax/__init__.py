"""w8a8_jax: FP8 W8A8 linear layers for JAX (vLLM's Fp8LinearOp semantics on XLA and Pallas)."""

import importlib

from w8a8_jax.block_scaled_mm import w8a8_block_fp8_matmul
from w8a8_jax.dispatch import Plan
from w8a8_jax.dtypes import FP8_E4M3FN, FP8_E4M3FNUZ, fp8_max
from w8a8_jax.linear import Fp8LinearOp, W8A8BlockFp8LinearOp, bucket_rows
from w8a8_jax.params import Fp8Params
from w8a8_jax.platform import fp8_dtype, fused_fp8_supported
from w8a8_jax.quantization import per_token_group_quant_fp8, scaled_fp8_quant
from w8a8_jax.scaled_mm import (
    dispatch_w8a8_scaled_mm,
    fused_w8a8_scaled_mm,
    xla_channelwise_w8a8_scaled_mm,
    xla_per_tensor_w8a8_scaled_mm,
    xla_per_token_w8a8_scaled_mm,
)
from w8a8_jax.scheme import Fp8Scheme
from w8a8_jax.weight_utils import (
    all_close_1d,
    convert_to_channelwise,
    normalize_e4m3fn_to_e4m3fnuz,
    per_tensor_dequantize,
    requantize_with_max_scale,
)

__version__ = "0.1.0"

# The wings load on first use, so `import w8a8_jax` loads neither flax, safetensors nor tqdm.
_WINGS = ("checkpoint", "convert", "linen", "nnx", "sharding")


def __getattr__(name: str):
    if name in _WINGS:
        return importlib.import_module(f"w8a8_jax.{name}")
    raise AttributeError(f"module 'w8a8_jax' has no attribute {name!r}")


__all__ = [
    "FP8_E4M3FN",
    "FP8_E4M3FNUZ",
    "Fp8LinearOp",
    "Fp8Params",
    "Fp8Scheme",
    "Plan",
    "W8A8BlockFp8LinearOp",
    "all_close_1d",
    "bucket_rows",
    "checkpoint",
    "convert",
    "convert_to_channelwise",
    "dispatch_w8a8_scaled_mm",
    "fp8_dtype",
    "fp8_max",
    "fused_fp8_supported",
    "fused_w8a8_scaled_mm",
    "linen",
    "nnx",
    "normalize_e4m3fn_to_e4m3fnuz",
    "per_tensor_dequantize",
    "per_token_group_quant_fp8",
    "requantize_with_max_scale",
    "scaled_fp8_quant",
    "sharding",
    "w8a8_block_fp8_matmul",
    "xla_channelwise_w8a8_scaled_mm",
    "xla_per_tensor_w8a8_scaled_mm",
    "xla_per_token_w8a8_scaled_mm",
]
