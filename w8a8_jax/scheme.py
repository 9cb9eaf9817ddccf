"""`Fp8Scheme`: how one fp8 linear layer quantizes, the one spelling every part of the package uses.

The modules (`scheme=` or their keyword arguments), `convert.QuantizationRule`, the checkpoint's
`QuantizationConfig`, the demo and the command line all hold an `Fp8Scheme`; `merge` reconciles a
`scheme=` argument with the keyword arguments that spell the same fields one by one.
"""

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from w8a8_jax import dtypes

WeightGranularity = Literal["per_tensor", "per_channel", "block"]
ActivationScheme = Literal["static", "dynamic_per_tensor", "dynamic_per_token", "dynamic_per_token_group"]
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "block")
ACTIVATION_SCHEMES = ("static", "dynamic_per_tensor", "dynamic_per_token", "dynamic_per_token_group")
# DeepSeek-V3's and Qwen3-FP8's weight block `(bn, bk)`; the activation group is `bk`.
DEFAULT_BLOCK_SIZE = (128, 128)

# The short names of the command line (`--weights`, `--activations`); the weight names are also
# compressed-tensors' weight `strategy`.
WEIGHT_NAMES = {"tensor": "per_tensor", "channel": "per_channel", "block": "block"}
ACTIVATION_NAMES = {
    "static": "static",
    "dynamic": "dynamic_per_tensor",
    "dynamic-token": "dynamic_per_token",
    "dynamic-group": "dynamic_per_token_group",
}


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """How one fp8 layer quantizes: weight granularity, activation scheme, bound, kernel, fp8 dtype.

    >>> Fp8Scheme("per_tensor", "static").is_static
    True
    >>> Fp8Scheme("block").activation_scheme, Fp8Scheme("block").block_size
    ('dynamic_per_token_group', (128, 128))

    Attributes:
      weight_granularity: "per_tensor" (`weight_scale (1,)`), "per_channel" (`(N, 1)`) or "block"
        (`(ceil(N / bn), ceil(K / bk))`, one scale per `block_size` block: DeepSeek-V3's form).
      activation_scheme: "static" (calibrated `input_scale (1,)`), "dynamic_per_tensor",
        "dynamic_per_token" (scales computed from each input) or "dynamic_per_token_group" (one
        scale per token and group of `bk` along K). Block weights take only the last, and a
        "dynamic_per_token" given with them (the default) reads as it.
      scale_ub: upper bound on a token's amax; dynamic per-token only.
      fused: allow the fused Pallas kernel; None detects it on each call.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz to quantize weights to; None is the platform's.
        A built layer's weight dtype is what its activations are quantized to.
      block_size: `(bn, bk)` of block weights, default (128, 128); None for the other granularities.
    """

    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    fused: bool | None = None
    fp8_dtype: Any = None
    block_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}, got {self.activation_scheme!r}")
        if self.is_block:
            if self.activation_scheme == "dynamic_per_token":
                object.__setattr__(self, "activation_scheme", "dynamic_per_token_group")
            if self.activation_scheme != "dynamic_per_token_group":
                raise ValueError(
                    "block weights quantize their activations per token group (activation_scheme="
                    f"'dynamic_per_token_group'), got activation_scheme={self.activation_scheme!r}"
                )
            object.__setattr__(self, "block_size", check_block_size(self.block_size or DEFAULT_BLOCK_SIZE))
        else:
            if self.activation_scheme == "dynamic_per_token_group":
                raise ValueError(
                    "activation_scheme='dynamic_per_token_group' goes with block weights (weight_granularity='block'), "
                    f"got weight_granularity={self.weight_granularity!r}"
                )
            if self.block_size is not None:
                raise ValueError(
                    f"block_size applies only to weight_granularity='block', got {self.weight_granularity!r}"
                )
        if self.scale_ub is not None and self.activation_scheme != "dynamic_per_token":
            raise ValueError(
                f"scale_ub applies only to activation_scheme='dynamic_per_token', got {self.activation_scheme!r}"
            )
        if self.scale_ub is not None and not (math.isfinite(self.scale_ub) and self.scale_ub > 0):
            raise ValueError(f"scale_ub must be finite and > 0, got {self.scale_ub}")
        if self.fp8_dtype is not None:
            fp8_dtype = np.dtype(self.fp8_dtype)
            if not dtypes.is_fp8(fp8_dtype):
                raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
            object.__setattr__(self, "fp8_dtype", fp8_dtype)

    @property
    def is_static(self) -> bool:
        return self.activation_scheme == "static"

    @property
    def per_token(self) -> bool:
        return self.activation_scheme == "dynamic_per_token"

    @property
    def per_tensor_weights(self) -> bool:
        return self.weight_granularity == "per_tensor"

    @property
    def is_block(self) -> bool:
        return self.weight_granularity == "block"

    @classmethod
    def from_names(cls, weights: str, activations: str, **fields) -> "Fp8Scheme":
        """From the command line's short names: weights "tensor" | "channel" | "block", activations
        "static" | "dynamic" | "dynamic-token" | "dynamic-group"."""
        if weights not in WEIGHT_NAMES:
            raise ValueError(f"weights must be one of {tuple(WEIGHT_NAMES)}, got {weights!r}")
        if activations not in ACTIVATION_NAMES:
            raise ValueError(f"activations must be one of {tuple(ACTIVATION_NAMES)}, got {activations!r}")
        return cls(WEIGHT_NAMES[weights], ACTIVATION_NAMES[activations], **fields)


def check_block_size(block_size) -> tuple[int, int]:
    """`block_size` as `(bn, bk)`, two ints >= 1 (any sequence of two, e.g. a JSON list)."""
    try:
        bn, bk = (int(v) for v in block_size)
        valid = not any(isinstance(v, bool) for v in block_size) and all(int(v) == v for v in block_size)
        valid = valid and bn >= 1 and bk >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"block_size must be two ints >= 1, (bn, bk), got {block_size!r}")
    return bn, bk


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Fp8Scheme)}


def merge(scheme: Fp8Scheme | None, **fields) -> Fp8Scheme:
    """The one scheme a caller meant: `scheme`, or one built from the keyword `fields`.

    A field given both ways must agree (a keyword left at its default defers to `scheme`);
    otherwise a ValueError names it.
    """
    if scheme is None:
        return Fp8Scheme(**fields)
    if not isinstance(scheme, Fp8Scheme):
        raise TypeError(f"scheme must be an Fp8Scheme, got {type(scheme).__name__}")
    for name, value in fields.items():
        if value is not None and name == "fp8_dtype":
            value = np.dtype(value)
        if value is not None and name == "block_size":
            value = check_block_size(value)
        if name == "activation_scheme" and value == "dynamic_per_token" and scheme.is_block:
            continue  # what block weights read it as
        if value != _DEFAULTS[name] and value != getattr(scheme, name):
            raise ValueError(
                f"{name}={value!r} contradicts scheme.{name}={getattr(scheme, name)!r}: pass scheme= or {name}=, not both"
            )
    return scheme


def scheme_fields(scheme: Fp8Scheme) -> dict[str, Any]:
    """The scheme's fields by name, to set on a dataclass that also spells them one by one."""
    return {name: getattr(scheme, name) for name in _DEFAULTS}
