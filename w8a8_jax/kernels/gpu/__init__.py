"""Hopper (sm90) Pallas Mosaic GPU kernels: the fused fp8 GEMM and per-token quantization.

Importing this package registers them as the "gpu" fused kernel (`platform.register_fused_kernel`);
they run on devices of compute capability 9.x and on shapes `supports_shape` accepts.
"""

import jax

from w8a8_jax import platform
from w8a8_jax import scaled_mm as xla_paths
from w8a8_jax.kernels.gpu import scaled_mm as _scaled_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes
from w8a8_jax.kernels.gpu.quant import per_token_quant


def supports_device(device: jax.Device) -> bool:
    """A CUDA GPU of compute capability 9.x (H100, H200)."""
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def _fused_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype):
    """The kernel where it measured faster than XLA's fp8 GEMM, else XLA's path (same math)."""
    (m, k), n = qinput.shape, weight.shape[0]
    if tuned_block_sizes.kernel_is_faster(m, k, n):
        return _scaled_mm.scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype)
    if scale_a.size == 1 and scale_b.size == 1:
        return xla_paths.xla_per_tensor_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype)
    return xla_paths.xla_per_token_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype)


platform.register_fused_kernel(
    "gpu",
    platform.FusedKernel(
        scaled_mm=_fused_scaled_mm,
        supports_device=supports_device,
        supports_shape=_scaled_mm.supports_shape,
        per_token_quant=per_token_quant,
    ),
)
