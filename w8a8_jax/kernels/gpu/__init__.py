"""Hopper (sm90) Pallas Mosaic GPU kernels: the fused fp8 GEMM, the block-scaled GEMM, per-token
and per-token-group quantization.

Importing this package registers them as the "gpu" fused kernel (`platform.register_fused_kernel`)
with what they take and the measured rule of where the GEMM beats XLA; `dispatch.plan` decides from that.
They run on devices of compute capability 9.x.

The block-scaled GEMM (`block_scaled_mm`) and the group quant (`group_quant`) are not registered
yet: they are checked in interpret mode and lowered for CUDA on CPU, not yet run and timed on a
Hopper GPU (docs/gpu.md). `BLOCK_FUSED_KERNEL` is the registered kernel with both, for tests and
benchmarks (`platform.override(fused_kernel=BLOCK_FUSED_KERNEL)`).
"""

import dataclasses

import jax
import numpy as np

from w8a8_jax import dtypes, platform
from w8a8_jax.kernels.gpu import block_scaled_mm, group_quant, quant, tuned_block_sizes
from w8a8_jax.kernels.gpu import scaled_mm as _scaled_mm


def supports_device(device: jax.Device) -> bool:
    """A CUDA GPU of compute capability 9.x (H100, H200)."""
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


FUSED_KERNEL = platform.FusedKernel(
    scaled_mm=_scaled_mm.scaled_mm,
    supports_device=supports_device,
    supports_shape=_scaled_mm.supports_shape,
    faster_than_xla=lambda m, k, n: tuned_block_sizes.kernel_is_faster(m, k, n, platform.num_sms()),
    fp8_dtypes=(np.dtype(dtypes.FP8_E4M3FN),),
    per_token_quant=quant.per_token_quant,
    per_token_quant_supports=quant.supports,
)

BLOCK_FUSED_KERNEL = dataclasses.replace(
    FUSED_KERNEL,
    block_scaled_mm=block_scaled_mm.block_scaled_mm,
    block_scaled_mm_supports=block_scaled_mm.supports,
    per_token_group_quant=group_quant.per_token_group_quant,
    per_token_group_quant_supports=group_quant.supports,
)

platform.register_fused_kernel("gpu", FUSED_KERNEL)
