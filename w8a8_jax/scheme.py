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

WeightGranularity = Literal["per_tensor", "per_channel"]
ActivationScheme = Literal["static", "dynamic_per_tensor", "dynamic_per_token"]
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACTIVATION_SCHEMES = ("static", "dynamic_per_tensor", "dynamic_per_token")

# The short names of the command line (`--weights`, `--activations`); the weight names are also
# compressed-tensors' weight `strategy`.
WEIGHT_NAMES = {"tensor": "per_tensor", "channel": "per_channel"}
ACTIVATION_NAMES = {"static": "static", "dynamic": "dynamic_per_tensor", "dynamic-token": "dynamic_per_token"}


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """How one fp8 layer quantizes: weight granularity, activation scheme, bound, kernel, fp8 dtype.

    >>> Fp8Scheme("per_tensor", "static").is_static
    True

    Attributes:
      weight_granularity: "per_tensor" (`weight_scale (1,)`) or "per_channel" (`(N, 1)`).
      activation_scheme: "static" (calibrated `input_scale (1,)`), "dynamic_per_tensor" or
        "dynamic_per_token" (scales computed from each input).
      scale_ub: upper bound on a token's amax; dynamic per-token only.
      fused: allow the fused Pallas kernel; None detects it on each call.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz to quantize weights to; None is the platform's.
        A built layer's weight dtype is what its activations are quantized to.
    """

    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    fused: bool | None = None
    fp8_dtype: Any = None

    def __post_init__(self):
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.weight_granularity!r}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}, got {self.activation_scheme!r}")
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

    @classmethod
    def from_names(cls, weights: str, activations: str, **fields) -> "Fp8Scheme":
        """From the command line's short names: weights "tensor" | "channel", activations "static" |
        "dynamic" | "dynamic-token"."""
        if weights not in WEIGHT_NAMES:
            raise ValueError(f"weights must be one of {tuple(WEIGHT_NAMES)}, got {weights!r}")
        if activations not in ACTIVATION_NAMES:
            raise ValueError(f"activations must be one of {tuple(ACTIVATION_NAMES)}, got {activations!r}")
        return cls(WEIGHT_NAMES[weights], ACTIVATION_NAMES[activations], **fields)


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
        if value != _DEFAULTS[name] and value != getattr(scheme, name):
            raise ValueError(
                f"{name}={value!r} contradicts scheme.{name}={getattr(scheme, name)!r}: pass scheme= or {name}=, not both"
            )
    return scheme


def scheme_fields(scheme: Fp8Scheme) -> dict[str, Any]:
    """The scheme's fields by name, to set on a dataclass that also spells them one by one."""
    return {name: getattr(scheme, name) for name in _DEFAULTS}
