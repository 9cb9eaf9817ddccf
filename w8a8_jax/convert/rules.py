"""Which layers the converter quantizes, and how: rules matched on module paths."""

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax

from w8a8_jax import quantization, validation
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import ActivationScheme, Fp8Scheme, WeightGranularity


@dataclasses.dataclass(frozen=True)
class QuantizationRule:
    """Which layers to convert (a regex on the module path) and how.

    Args:
      module_path: regex that must match the whole "/"-joined path (default ".*", every layer).
      weight_granularity: "per_channel" (default), "per_tensor" or "block".
      weights: the same by the command line's short name ("channel", "tensor", "block"); None
        defers to weight_granularity.
      block_size: `(bn, bk)` of block weights (default (128, 128)).
      activation_scheme: "dynamic_per_token" (default), "dynamic_per_tensor" or "static".
      scale_ub: upper bound on a token's amax (dynamic per-token only).
      fused: allow the fused Pallas kernel; None detects it.
      shard_widths: for a fused projection, the output widths of its shards (QKV: `(q, k, v)`);
        each shard gets its own scale and they are fused as vLLM does (see `weight_utils.fuse_fp8_shards`);
        block weights are quantized block by block over the fused kernel.
      quantize: False keeps matched layers float (e.g. an `lm_head` rule before a catch-all).
      scheme: an `Fp8Scheme` instead of weight_granularity, activation_scheme, scale_ub, fused
        and block_size (a field given as well must agree); after construction it always holds the
        rule's scheme.
    """

    module_path: str = ".*"
    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    fused: bool | None = None
    shard_widths: tuple[int, ...] | None = None
    quantize: bool = True
    weights: str | None = None
    block_size: tuple[int, int] | None = None
    scheme: Fp8Scheme | None = None

    def __post_init__(self):
        granularity = self.weight_granularity
        if self.weights is not None:
            if self.weights not in scheme_lib.WEIGHT_NAMES:
                raise ValueError(f"weights must be one of {tuple(scheme_lib.WEIGHT_NAMES)}, got {self.weights!r}")
            named = scheme_lib.WEIGHT_NAMES[self.weights]
            if granularity not in ("per_channel", named):  # per_channel: the field's default
                raise ValueError(f"weights={self.weights!r} contradicts weight_granularity={granularity!r}")
            granularity = named
        scheme = scheme_lib.merge(
            self.scheme,
            weight_granularity=granularity,
            activation_scheme=self.activation_scheme,
            scale_ub=self.scale_ub,
            fused=self.fused,
            block_size=self.block_size,
        )
        for name in ("weight_granularity", "activation_scheme", "scale_ub", "fused", "block_size"):
            object.__setattr__(self, name, getattr(scheme, name))
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(
            self, "weights", {v: k for k, v in scheme_lib.WEIGHT_NAMES.items()}[scheme.weight_granularity]
        )


def find_rule(rules: Sequence[QuantizationRule], path: str) -> QuantizationRule | None:
    """The first rule whose `module_path` fully matches `path`, or None (also for `quantize=False`)."""
    for rule in rules:
        if re.fullmatch(rule.module_path, path):
            return rule if rule.quantize else None
    return None


def params_maker(path: str, rule: QuantizationRule, amax: dict, fp8_dtype):
    """The layer's scheme (in `fp8_dtype` unless the rule names one) and `kernel, bias ->
    Fp8Params` for it, with its calibrated input scale."""
    scheme = rule.scheme
    if scheme.fp8_dtype is None:
        scheme = dataclasses.replace(scheme, fp8_dtype=fp8_dtype)
    input_scale = _static_input_scale(path, amax.get(path), scheme.fp8_dtype) if scheme.is_static else None
    return scheme, functools.partial(
        Fp8Params.from_float,
        scheme=scheme,
        input_scale=input_scale,
        shard_widths=rule.shard_widths,
        name=f"the kernel of layer {path!r}",
    )


def _static_input_scale(path: str, stats: dict | None, fp8_dtype) -> jax.Array:
    """The calibrated `input_scale (1,)` of static layer `path` from its merged stats."""
    if stats is None:
        raise ValueError(f"static layer {path!r} was not called on calibration_data")
    return quantization.static_input_scale(stats["input_amax"], fp8_dtype)


def check_kernel(path: str, kernel) -> None:
    """A layer's float kernel (stacked or not) must be finite to be quantized."""
    validation.check_finite(f"the kernel of layer {path!r}", kernel, ": weights must be finite to be quantized")


def check_batch_stats(batch: int, stats: dict[str, dict | None]) -> None:
    """Raises if calibration batch `batch` fed layers a NaN or Inf (their merged stats count them)."""
    poisoned = sorted(path for path, layer in stats.items() if layer is not None and float(layer["nonfinite"]) > 0)
    if poisoned:
        raise ValueError(
            f"calibration batch {batch}: the inputs of layer(s) {poisoned} hold NaN or Inf; calibration data must be finite"
        )


def check_calibration(static_paths: list[str], stacked_static: list[str], batches: list) -> None:
    if stacked_static:
        raise NotImplementedError(
            f"static calibration of stacked (scanned) layers is not supported: {stacked_static}; "
            "use a dynamic activation scheme for them"
        )
    if static_paths and not batches:
        raise ValueError(f"static layers {static_paths} need calibration_data to set their input_scale")
