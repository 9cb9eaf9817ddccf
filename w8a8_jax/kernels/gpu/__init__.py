"""Hopper (sm90) Pallas Mosaic GPU kernels: the fused fp8 GEMM and per-token quantization.

Importing this package registers them as the "gpu" fused kernel (`platform.register_fused_kernel`)
with what they take and the measured rule of where the GEMM beats XLA; `dispatch.plan` decides from that.
They run on devices of compute capability 9.x.
"""

import jax
import numpy as np

from w8a8_jax import dtypes, platform
from w8a8_jax.kernels.gpu import quant, tuned_block_sizes
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

platform.register_fused_kernel("gpu", FUSED_KERNEL)
