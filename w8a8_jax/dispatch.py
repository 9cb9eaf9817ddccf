"""The plan: which quantizer and which GEMM run for one fp8 linear layer and one input.

This is the only place that decides. `plan` is a pure function of the layer's scheme, the shapes
and dtypes, and the platform's fused kernel (its capabilities and measured rule, passed in): it
calls vLLM's four-boolean tree (`scaled_mm.dispatch_w8a8_scaled_mm`) for the GEMM path, then
refines the fused branch by what the kernel takes and where it measured faster, and picks the
quantizer. `Fp8LinearOp` resolves the plan outside its jitted function and passes it in as static
configuration, so the plan is part of the compilation cache key: a kernel registered or
overridden later takes effect on the next call.

Quantizers (`Plan.quantizer`):
  None                             fp8 input, already quantized with its `input_scale`
  "quantize_per_tensor"            XLA: static scale, `fp8(clamp(x * (1 / s)))`
  "quantize_dynamic_per_tensor"    XLA: one scale from the amax of the whole input
  "quantize_per_token"             XLA: one scale per row
  "kernel.per_token_quant"         the platform's fused per-token quant kernel
  "kernel.quant_scaled_mm"         inside the GEMM kernel, which then is the GEMM too
  "quantize_per_token_group"       XLA: one scale per row and group of bk (block schemes)
  "kernel.per_token_group_quant"   the platform's fused per-token-group quant kernel
  "kernel.quant_block_scaled_mm"   inside the block GEMM kernel, which then is the GEMM too
GEMMs (`Plan.gemm`): the names of `scaled_mm`'s paths, or "kernel.quant_scaled_mm"; for block
schemes (`Plan.block_size` set) "xla_block_w8a8_scaled_mm" or "xla_block_dequant_w8a8_scaled_mm"
(`block_scaled_mm`), "kernel.block_scaled_mm" or "kernel.quant_block_scaled_mm".
"""

import dataclasses

import jax
import numpy as np

from w8a8_jax import dtypes, scaled_mm
from w8a8_jax.platform import FusedKernel
from w8a8_jax.scheme import ActivationScheme, Fp8Scheme

XLA_QUANTIZERS = {
    "static": "quantize_per_tensor",
    "dynamic_per_tensor": "quantize_dynamic_per_tensor",
    "dynamic_per_token": "quantize_per_token",
}
KERNEL_PER_TOKEN_QUANT = "kernel.per_token_quant"
KERNEL_QUANT_SCALED_MM = "kernel.quant_scaled_mm"
FUSED_GEMM = scaled_mm.fused_w8a8_scaled_mm.__name__
QUANTIZE_PER_TOKEN_GROUP = "quantize_per_token_group"
XLA_BLOCK_GEMM = "xla_block_w8a8_scaled_mm"
XLA_BLOCK_DEQUANT_GEMM = "xla_block_dequant_w8a8_scaled_mm"
# Outputs (M x N) from which, on CUDA, XLA's block GEMM runs dequantized (measured on the H200,
# benchmarks/NOTES.md, block fp8 v1: below it the per-k-block fp8 GEMMs are faster, above it their float32
# partial products cost more than three bf16 GEMMs).
BLOCK_DEQUANT_MIN_OUTPUTS = 4 << 20
KERNEL_BLOCK_SCALED_MM = "kernel.block_scaled_mm"
KERNEL_QUANT_BLOCK_SCALED_MM = "kernel.quant_block_scaled_mm"
KERNEL_PER_TOKEN_GROUP_QUANT = "kernel.per_token_group_quant"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one layer and input shape.

    Attributes:
      quantizer: the quantizer's name (module docstring), None for fp8 input.
      gemm: the GEMM's name: one of `scaled_mm`'s four paths, or "kernel.quant_scaled_mm".
      reason: why, in words (not part of equality: plans that run the same code are equal).
      kernel: the fused kernel whose functions the plan runs; None when it runs none of them.
      depends_on_rows: whether another M could change the GEMM (the kernel's measured rule was
        read).
      block_size: `(bn, bk)` of a block scheme's weights (its activation group is bk); None otherwise.
    """

    quantizer: str | None
    gemm: str
    reason: str = dataclasses.field(default="", compare=False)
    kernel: FusedKernel | None = dataclasses.field(default=None, repr=False)
    depends_on_rows: bool = dataclasses.field(default=False, compare=False)
    block_size: tuple[int, int] | None = None


def choose_quantizer(
    activation_scheme: ActivationScheme, k: int, input_dtype, fp8_dtype, kernel: FusedKernel | None
) -> tuple[str, str]:
    """`(quantizer name, reason)` for a float input `(M, K)` quantized outside the GEMM."""
    if activation_scheme != "dynamic_per_token":
        return XLA_QUANTIZERS[activation_scheme], f"{activation_scheme} activations: the XLA formula"
    if kernel is None or kernel.per_token_quant is None:
        return XLA_QUANTIZERS[activation_scheme], "no per-token quant kernel: the XLA formula"
    if np.dtype(fp8_dtype) not in kernel.fp8_dtypes or not kernel.per_token_quant_supports(k, input_dtype, fp8_dtype):
        return (
            XLA_QUANTIZERS[activation_scheme],
            f"the per-token quant kernel does not take K={k}, {np.dtype(input_dtype).name} -> "
            f"{np.dtype(fp8_dtype).name}: the XLA formula",
        )
    return KERNEL_PER_TOKEN_QUANT, "the fused per-token quant kernel"


def _kernel_takes_gemm(kernel: FusedKernel | None, k: int, n: int, fp8_dtype) -> tuple[bool, str]:
    if kernel is None:
        return False, "no fused kernel (none on this device, or fused_supported=False)"
    if np.dtype(fp8_dtype) not in kernel.fp8_dtypes:
        return False, f"the fused kernel takes {[d.name for d in kernel.fp8_dtypes]}, not {np.dtype(fp8_dtype).name}"
    if not kernel.supports_shape(k, n):
        return False, f"the fused kernel does not take K={k}, N={n}"
    return True, "the fused kernel takes the shape"


def plan(
    scheme: Fp8Scheme,
    *,
    input_shape: tuple[int, int],
    input_dtype,
    weight_shape: tuple[int, int],
    weight_dtype,
    out_dtype,
    kernel: FusedKernel | None,
) -> Plan:
    """The plan for `input (M, K)` through a layer with `weight (N, K)` quantized by `scheme`.

    Args:
      scheme: the layer's weight granularity and activation scheme (static: an `input_scale`;
        fp8 input is quantized statically).
      input_shape: `(M, K)` as the GEMM sees it (M after bucketing).
      input_dtype: bf16/f16/f32, or an fp8 dtype for pre-quantized input.
      weight_shape: `(N, K)`.
      weight_dtype: the fp8 dtype of the weight (and of the activation codes).
      out_dtype: the output dtype.
      kernel: the platform's fused kernel, or None where none may run.
    """
    (m, k), n = input_shape, weight_shape[0]
    if scheme.is_block:
        return _block_plan(scheme.block_size, m, k, n, input_dtype, weight_dtype, out_dtype, kernel)
    per_tensor_activations = not scheme.per_token
    takes, why = _kernel_takes_gemm(kernel, k, n, weight_dtype)
    path = scaled_mm.dispatch_w8a8_scaled_mm(takes, scheme.per_tensor_weights, per_tensor_activations, scheme.per_token)
    gemm = path.__name__
    depends_on_rows = gemm == FUSED_GEMM
    if gemm == FUSED_GEMM and not kernel.faster_than_xla(m, k, n):
        # Not faster here by the kernel's measured rule: XLA's GEMM of the same (rowwise-scaled) math.
        both_per_tensor = scheme.per_tensor_weights and per_tensor_activations
        gemm = (
            scaled_mm.xla_per_tensor_w8a8_scaled_mm if both_per_tensor else scaled_mm.xla_per_token_w8a8_scaled_mm
        ).__name__
        why = f"the fused kernel's measured rule says XLA is faster at M={m}, K={k}, N={n}"
    elif gemm != FUSED_GEMM and takes:
        why = f"{why}, but the tree picks XLA for this scheme"

    if dtypes.is_fp8(input_dtype):
        quantizer, quant_why = None, "fp8 input"
    elif (
        gemm == FUSED_GEMM
        and kernel.quant_scaled_mm is not None
        and scheme.activation_scheme != "dynamic_per_tensor"
        and kernel.quant_scaled_mm_supports(m, k, n, input_dtype, weight_dtype, out_dtype, scheme.per_token)
    ):
        quantizer = gemm = KERNEL_QUANT_SCALED_MM
        quant_why = "quantized inside the GEMM kernel"
    else:
        quantizer, quant_why = choose_quantizer(scheme.activation_scheme, k, input_dtype, weight_dtype, kernel)
    runs_kernel = gemm in (FUSED_GEMM, KERNEL_QUANT_SCALED_MM) or quantizer == KERNEL_PER_TOKEN_QUANT
    reason = f"GEMM: {why}; quantizer: {quant_why}"
    return Plan(quantizer, gemm, reason, kernel if runs_kernel else None, depends_on_rows)


def _block_plan(block_size, m, k, n, input_dtype, weight_dtype, out_dtype, kernel: FusedKernel | None) -> Plan:
    """A block scheme's plan: the kernel's block GEMM where it takes the shape, else XLA's."""
    if kernel is None or kernel.block_scaled_mm is None:
        takes, why = False, "no block-scaled fp8 kernel on this device (or fused_supported=False)"
    elif np.dtype(weight_dtype) not in kernel.fp8_dtypes:
        takes, why = False, f"the block kernel does not take {np.dtype(weight_dtype).name}"
    elif not kernel.block_scaled_mm_supports(m, k, n, block_size, weight_dtype):
        takes, why = False, f"the block kernel does not take M={m}, K={k}, N={n}, blocks {block_size}"
    else:
        takes, why = True, "the block kernel takes the shape"
    if takes:
        gemm = KERNEL_BLOCK_SCALED_MM
    elif scaled_mm.fp8_dot_is_cublas(weight_dtype):
        if m * n >= BLOCK_DEQUANT_MIN_OUTPUTS:
            gemm, why = XLA_BLOCK_DEQUANT_GEMM, f"{why}: M x N = {m * n} outputs, XLA's dequantized block GEMM"
        else:
            gemm, why = XLA_BLOCK_GEMM, f"{why}: XLA's per-k-block fp8 GEMMs"
    elif jax.default_backend() == "cpu":
        # XLA:CPU upcasts and transposes the whole weight for the batched per-k-block products on
        # every call: 5-22x slower than one float32 GEMM of the dequantized operands (M <= 512,
        # K x N = 576 x 1536, benchmarks/NOTES.md).
        gemm, why = XLA_BLOCK_DEQUANT_GEMM, f"{why}: on CPU, XLA's dequantized block GEMM"
    else:
        gemm, why = XLA_BLOCK_GEMM, f"{why}: XLA's per-k-block fp8 GEMMs"
    if dtypes.is_fp8(input_dtype):
        quantizer, quant_why = None, "fp8 input"
    elif (
        takes
        and kernel.quant_block_scaled_mm is not None
        and kernel.quant_block_scaled_mm_supports(m, k, n, block_size, input_dtype, weight_dtype, out_dtype)
    ):
        quantizer = gemm = KERNEL_QUANT_BLOCK_SCALED_MM
        quant_why = "quantized inside the block GEMM kernel"
    elif (
        kernel is not None
        and kernel.per_token_group_quant is not None
        and kernel.per_token_group_quant_supports(m, k, block_size[1], input_dtype, weight_dtype)
    ):
        quantizer, quant_why = KERNEL_PER_TOKEN_GROUP_QUANT, f"per token in groups of {block_size[1]}: the fused kernel"
    else:
        quantizer, quant_why = QUANTIZE_PER_TOKEN_GROUP, f"per token in groups of {block_size[1]}: the XLA formula"
    # M decides the CUDA formulation and may decide the kernel's `supports`.
    depends_on_rows = scaled_mm.fp8_dot_is_cublas(weight_dtype) or (
        kernel is not None and kernel.block_scaled_mm is not None
    )
    return Plan(
        quantizer,
        gemm,
        f"GEMM: {why}; quantizer: {quant_why}",
        kernel if takes or quantizer == KERNEL_PER_TOKEN_GROUP_QUANT else None,
        depends_on_rows,
        block_size=tuple(block_size),
    )
