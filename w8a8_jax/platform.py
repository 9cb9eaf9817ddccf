"""Platform capabilities: the platform's fp8 dtype and the fused Pallas kernels registered per backend.

vLLM reads these from `current_platform` (fp8 dtype, CUTLASS support). Here they come from the JAX
backend and from a registry the kernel packages fill in; `override` replaces them for tests.
"""

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator

import jax
import numpy as np

from w8a8_jax import dtypes

ScaledMM = Callable[..., jax.Array]


def _always(*args) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """A platform's fused fp8 kernels and what they take: capabilities and measured rules only.

    Which of them runs for a layer and an input is decided in one place, `dispatch.plan`, from these
    answers; the kernels themselves route nothing.

    Attributes:
      scaled_mm: `(qinput, weight, scale_a, scale_b, bias, out_dtype) -> (M, N)`, the signature of
        every scaled-GEMM path.
      supports_device: whether a given `jax.Device` can run the kernels (e.g. compute capability).
      supports_shape: `(k, n) -> bool`, whether the GEMM takes that contraction and output width.
      faster_than_xla: `(m, k, n) -> bool`, the measured rule: whether the GEMM beats XLA's fp8
        GEMM at that (bucketed) shape. Where it does not, the plan runs XLA's GEMM of the same math.
      fp8_dtypes: the fp8 dtypes the kernels take.
      per_token_quant: optional fused dynamic per-token quantizer,
        `(input (M, K), scale_ub (1,) | None, fp8_dtype) -> (q (M, K), scale (M, 1))`.
      per_token_quant_supports: `(k, input_dtype, fp8_dtype) -> bool`, the inputs it takes.
      quant_scaled_mm: optional GEMM that quantizes its float input itself, static or dynamic
        per-token, with codes identical to `scaled_fp8_quant`'s: `(x (M, K), weight, weight_scale,
        *, input_scale, scale_ub, bias, out_dtype) -> (M, N)`.
      quant_scaled_mm_supports: `(m, k, n, input_dtype, fp8_dtype, out_dtype, per_token) -> bool`,
        the shapes it quantizes in-kernel (e.g. a whole row in one block for per-token).
      block_scaled_mm: optional block-scaled GEMM (`block_scaled_mm`'s signature): `(qinput,
        weight, scale_a (M, KB), scale_b (ceil(N / bn), KB), block_size, bias, out_dtype) -> (M, N)`.
      block_scaled_mm_supports: `(m, k, n, block_size, fp8_dtype) -> bool`, where it runs (its
        tiling rules and, where measured, where it beats XLA's block GEMM).
      quant_block_scaled_mm: optional block GEMM that quantizes its float input per token group
        itself, codes identical to `per_token_group_quant_fp8`'s: `(x (M, K), weight, weight_scale,
        block_size, bias, out_dtype) -> (M, N)`.
      quant_block_scaled_mm_supports: `(m, k, n, block_size, input_dtype, fp8_dtype, out_dtype) ->
        bool`, the shapes it quantizes in-kernel.
      per_token_group_quant: optional fused dynamic per-token-group quantizer, codes and scales
        identical to `quantize_per_token_group`'s: `(x (M, K), group_size, fp8_dtype) -> (q (M, K),
        scale (M, ceil(K / group_size)))`.
      per_token_group_quant_supports: `(m, k, group_size, input_dtype, fp8_dtype) -> bool`, the
        inputs it takes (and, where measured, the M where it beats XLA's formula).
    """

    scaled_mm: ScaledMM
    supports_device: Callable[[jax.Device], bool]
    supports_shape: Callable[[int, int], bool] = _always
    faster_than_xla: Callable[[int, int, int], bool] = _always
    fp8_dtypes: tuple[np.dtype, ...] = dtypes.FP8_DTYPES
    per_token_quant: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    per_token_quant_supports: Callable[..., bool] = _always
    quant_scaled_mm: Callable[..., jax.Array] | None = None
    quant_scaled_mm_supports: Callable[..., bool] = _always
    block_scaled_mm: Callable[..., jax.Array] | None = None
    block_scaled_mm_supports: Callable[..., bool] = _always
    quant_block_scaled_mm: Callable[..., jax.Array] | None = None
    quant_block_scaled_mm_supports: Callable[..., bool] = _always
    per_token_group_quant: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    per_token_group_quant_supports: Callable[..., bool] = _always


# Kernel packages register themselves on import; these are imported on the first query.
_KERNEL_MODULES = {"gpu": "w8a8_jax.kernels.gpu", "tpu": "w8a8_jax.kernels.tpu"}
_registry: dict[str, FusedKernel] = {}
_overrides: dict[str, object] = {}


def register_fused_kernel(backend: str, kernel: FusedKernel) -> None:
    """Makes `kernel` the fused path on `backend` ("gpu" or "tpu")."""
    _registry[backend] = kernel


def _default_device() -> jax.Device:
    return jax.devices()[0]


def fused_kernel() -> FusedKernel | None:
    """The fused kernel usable on the default device, or None."""
    if "fused_kernel" in _overrides:
        return _overrides["fused_kernel"]
    device = _default_device()
    backend = device.platform
    module = _KERNEL_MODULES.get(backend)
    if module is not None and backend not in _registry:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    kernel = _registry.get(backend)
    if kernel is None or not kernel.supports_device(device):
        return None
    return kernel


def fused_fp8_supported() -> bool:
    """Whether a fused Pallas fp8 GEMM runs on the default device (vLLM: `cutlass_fp8_supported`)."""
    return fused_kernel() is not None


def is_rocm() -> bool:
    """Whether the default device is an AMD GPU."""
    device = _default_device()
    return device.platform == "gpu" and "rocm" in device.client.platform_version.lower()


def fp8_dtype() -> np.dtype:
    """The fp8 dtype this platform quantizes to: float8_e4m3fnuz on ROCm, else float8_e4m3fn."""
    if "fp8_dtype" in _overrides:
        return np.dtype(_overrides["fp8_dtype"])
    return np.dtype(dtypes.FP8_E4M3FNUZ if is_rocm() else dtypes.FP8_E4M3FN)


def resolve_fp8_dtype(requested) -> np.dtype:
    """The fp8 dtype `requested`, checked, or the platform's (`fp8_dtype()`) when None."""
    dtype = fp8_dtype() if requested is None else np.dtype(requested)
    if not dtypes.is_fp8(dtype):
        raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {dtype}")
    return dtype


def num_sms() -> int:
    """Streaming multiprocessors (GPU) or cores of the default device; 1 where it has none."""
    if "num_sms" in _overrides:
        return _overrides["num_sms"]
    return getattr(_default_device(), "core_count", 1)


_UNSET = object()


@contextlib.contextmanager
def override(
    *,
    fused_kernel: FusedKernel | None = _UNSET,
    fp8_dtype=_UNSET,
    num_sms: int = _UNSET,
) -> Iterator[None]:
    """Replaces platform answers inside the block, e.g. to run a kernel's path on CPU in tests.

    `fused_kernel=None` makes `fused_fp8_supported()` false; a `FusedKernel` makes it true.
    """
    saved = dict(_overrides)
    for name, value in (("fused_kernel", fused_kernel), ("fp8_dtype", fp8_dtype), ("num_sms", num_sms)):
        if value is not _UNSET:
            _overrides[name] = value
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
