"""TPU generations: which one a device is, its VMEM, and the dtype its MXU takes for fp8 operands.

The facts per generation (VMEM and SMEM per TensorCore, fp8 MXU support) are those JAX records
in its `TpuInfo` table; none was measured here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the kernels need to know about one TPU generation.

    Attributes:
      name: "v4", "v5e", "v5p", "v6e" or "v7".
      vmem_bytes: VMEM of one TensorCore; every block, double buffer and scratch must fit in it.
      fp8_mxu: whether the MXU multiplies float8_e4m3fn operands itself. Where it does not, the
        kernels move fp8 from HBM (half the bytes of bf16) and upcast each tile to bfloat16 in VMEM;
        the upcast is exact (every e4m3 value is a bfloat16 value).
      smem_bytes: scalar memory (SMEM) of one TensorCore; scalar operands (e.g. the block GEMM's
        weight scales) must fit in it.
    """

    name: str
    vmem_bytes: int
    fp8_mxu: bool
    smem_bytes: int


GENERATIONS = {
    "v4": Generation("v4", vmem_bytes=16 * MiB, fp8_mxu=False, smem_bytes=1 * MiB),
    "v5e": Generation("v5e", vmem_bytes=128 * MiB, fp8_mxu=False, smem_bytes=1 * MiB),
    "v5p": Generation("v5p", vmem_bytes=64 * MiB, fp8_mxu=False, smem_bytes=1 * MiB),
    "v6e": Generation("v6e", vmem_bytes=128 * MiB, fp8_mxu=False, smem_bytes=1 * MiB),
    "v7": Generation("v7", vmem_bytes=64 * MiB, fp8_mxu=True, smem_bytes=1 * MiB),
}

# `jax.Device.device_kind` strings of the generations above.
_DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "TPU7": "v7",
    "TPU7x": "v7",
    "TPU v7": "v7",
    "TPU v7x": "v7",
}

# The generation emulated in interpret mode on a non-TPU device unless one is named: the
# bf16-upcast kernel, which every supported generation can run.
INTERPRET_GENERATION = "v6e"


def generation_of(device: jax.Device) -> Generation | None:
    """The TPU generation of `device` (from its `device_kind`), or None if it is not a supported TPU."""
    if device.platform != "tpu":
        return None
    name = _DEVICE_KINDS.get(device.device_kind)
    return None if name is None else GENERATIONS[name]


def resolve(generation: str | None) -> Generation:
    """A `Generation` by name; None means the default device's, or `INTERPRET_GENERATION` off TPU."""
    if generation is None:
        device = jax.devices()[0]
        found = generation_of(device)
        if found is not None:
            return found
        if device.platform == "tpu":
            raise NotImplementedError(
                f"TPU device_kind {device.device_kind!r} is not one of the supported generations "
                f"{sorted(GENERATIONS)}; name one with generation=..."
            )
        return GENERATIONS[INTERPRET_GENERATION]
    try:
        return GENERATIONS[generation]
    except KeyError:
        raise ValueError(f"generation must be one of {sorted(GENERATIONS)}, got {generation!r}") from None


def mxu_dtype(gen: Generation, fp8_dtype) -> np.dtype:
    """The dtype of the MXU operands: the fp8 codes themselves on v7 (e4m3fn only), else bfloat16.

    e4m3fnuz has no MXU support on any generation and always goes through the exact bf16 upcast.
    """
    if gen.fp8_mxu and np.dtype(fp8_dtype) == np.dtype(jnp.float8_e4m3fn):
        return np.dtype(fp8_dtype)
    return np.dtype(jnp.bfloat16)
