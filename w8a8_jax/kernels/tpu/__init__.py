"""Pallas TPU kernels: the rowwise-scaled and block-scaled fp8 GEMMs (each optionally quantizing its
float input in-kernel) and the fused per-token quant, registered on import.

What runs where (generation from `jax.Device.device_kind`, see `hardware`):
  v7 (TPU7x):          fp8 (e4m3fn) operands go to the MXU as they are.
  v5e, v6e, v5p, v4:   fp8 moves from HBM (half of bf16's bytes) and each tile is upcast to bfloat16
                       in VMEM (exact) before the MXU; e4m3fnuz takes this path on every generation.
  other TPUs:          not supported; `supports_device` is False and the XLA paths run.
Everywhere: float32 accumulation in VMEM, bias in the last-k epilogue, one rounding; the rowwise
GEMM applies its scales in the epilogue, the block GEMM each k-block's scales at its k-step
(`block_scaled_mm`). These kernels were verified in TPU interpret mode on CPU only; see docs/tpu.md.
"""

import functools

from jax.experimental.pallas import tpu as pltpu

from w8a8_jax import platform
from w8a8_jax.kernels.tpu import hardware
from w8a8_jax.kernels.tpu.block_scaled_mm import (
    block_scaled_mm_supports,
    fused_quant_block_scaled_mm,
    quant_block_scaled_mm_supports,
    w8a8_block_scaled_mm,
)
from w8a8_jax.kernels.tpu.quant import per_token_quant
from w8a8_jax.kernels.tpu.scaled_mm import fused_quant_scaled_mm, per_token_fits, w8a8_scaled_mm
from w8a8_jax.kernels.tpu.tuned_block_sizes import BlockSizes

__all__ = [
    "BlockSizes",
    "block_scaled_mm_supports",
    "fused_quant_block_scaled_mm",
    "fused_quant_scaled_mm",
    "make_fused_kernel",
    "per_token_quant",
    "quant_block_scaled_mm_supports",
    "supports_device",
    "w8a8_block_scaled_mm",
    "w8a8_scaled_mm",
]


def supports_device(device) -> bool:
    """Whether `device` is a TPU of a supported generation (v4, v5e, v5p, v6e, v7)."""
    return hardware.generation_of(device) is not None


def _quant_scaled_mm_supports(m, k, n, x_dtype, fp8_dtype, out_dtype, per_token, *, generation) -> bool:
    """Static scales quantize in-kernel at any K; per-token needs the whole row in one block."""
    return not per_token or per_token_fits(m, k, n, x_dtype, fp8_dtype, out_dtype, generation=generation)


def make_fused_kernel(
    *, generation: str | None = None, interpret: pltpu.InterpretParams | bool | None = None
) -> platform.FusedKernel:
    """The TPU `FusedKernel`; `generation` and `interpret` (e.g. `pltpu.InterpretParams()` on CPU)
    are passed to every call, so tests can run the TPU kernels through the dispatch off TPU."""
    return platform.FusedKernel(
        scaled_mm=functools.partial(w8a8_scaled_mm, generation=generation, interpret=interpret),
        supports_device=supports_device,
        per_token_quant=functools.partial(per_token_quant, generation=generation, interpret=interpret),
        quant_scaled_mm=functools.partial(fused_quant_scaled_mm, generation=generation, interpret=interpret),
        quant_scaled_mm_supports=functools.partial(_quant_scaled_mm_supports, generation=generation),
        block_scaled_mm=functools.partial(w8a8_block_scaled_mm, generation=generation, interpret=interpret),
        block_scaled_mm_supports=functools.partial(block_scaled_mm_supports, generation=generation),
        quant_block_scaled_mm=functools.partial(
            fused_quant_block_scaled_mm, generation=generation, interpret=interpret
        ),
        quant_block_scaled_mm_supports=functools.partial(quant_block_scaled_mm_supports, generation=generation),
    )


platform.register_fused_kernel("tpu", make_fused_kernel())
