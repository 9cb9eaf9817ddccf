"""Hopper (sm90) Pallas Mosaic GPU kernels: the fused fp8 GEMM, the block-scaled GEMM, per-token
and per-token-group quantization.

Importing this package registers them as the "gpu" fused kernel (`platform.register_fused_kernel`)
with what they take and the measured rules of where each beats XLA (`tuned_block_sizes`);
`dispatch.plan` decides from that. They run on devices of compute capability 9.x.
"""

import jax
import numpy as np

from w8a8_jax import dtypes, platform
from w8a8_jax.kernels.gpu import block_scaled_mm, group_quant, quant, tuned_block_sizes
from w8a8_jax.kernels.gpu import scaled_mm as _scaled_mm


def supports_device(device: jax.Device) -> bool:
    """A CUDA GPU of compute capability 9.x (H100, H200)."""
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def _block_kernel_runs(m: int, k: int, n: int, block_size, fp8_dtype) -> bool:
    """Where the plan runs the block GEMM kernel: the blocks it takes, at M where it beats XLA's."""
    return block_scaled_mm.supports(m, k, n, block_size, fp8_dtype) and tuned_block_sizes.block_kernel_is_faster(m)


def _group_quant_runs(m: int, k: int, group_size: int, x_dtype, fp8_dtype) -> bool:
    """Where the plan runs the group quant kernel: the input it takes, at M where it beats XLA's formula."""
    return group_quant.supports(k, group_size, x_dtype, fp8_dtype) and tuned_block_sizes.group_quant_is_faster(m)


FUSED_KERNEL = platform.FusedKernel(
    scaled_mm=_scaled_mm.scaled_mm,
    supports_device=supports_device,
    supports_shape=_scaled_mm.supports_shape,
    faster_than_xla=lambda m, k, n: tuned_block_sizes.kernel_is_faster(m, k, n, platform.num_sms()),
    fp8_dtypes=(np.dtype(dtypes.FP8_E4M3FN),),
    per_token_quant=quant.per_token_quant,
    per_token_quant_supports=quant.supports,
    block_scaled_mm=block_scaled_mm.block_scaled_mm,
    block_scaled_mm_supports=_block_kernel_runs,
    per_token_group_quant=group_quant.per_token_group_quant,
    per_token_group_quant_supports=_group_quant_runs,
)

platform.register_fused_kernel("gpu", FUSED_KERNEL)
