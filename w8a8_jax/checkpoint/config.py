"""The `quantization_config` of an FP8 checkpoint, in both forms vLLM reads.

The compressed-tensors form (`"quant_method": "compressed-tensors"`, `"format": "float-quantized"`,
llm-compressor's output) holds per-tensor or per-channel weight scales and static, dynamic
per-tensor or dynamic per-token activations; vLLM and transformers both load it, so we write it by
default. `"quant_method": "fp8"` (vLLM's own form) holds per-tensor weight scales and a static or
dynamic activation scheme; vLLM loads it, but transformers reads that form as block-scaled fp8
(`weight_scale_inv`) and drops our `weight_scale`. Both map onto one `QuantizationConfig`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from w8a8_jax import scheme as scheme_lib
from w8a8_jax.scheme import ActivationScheme, Fp8Scheme, WeightGranularity

ConfigForm = Literal["fp8", "compressed-tensors"]
CONFIG_FORMS = ("fp8", "compressed-tensors")

# compressed-tensors strategy names <-> ours (its weight strategies are the command line's names).
_CT_WEIGHT_STRATEGY = scheme_lib.WEIGHT_NAMES
_CT_INPUT_STRATEGY = {
    ("tensor", False): "static",
    ("tensor", True): "dynamic_per_tensor",
    ("token", True): "dynamic_per_token",
}


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How every fp8 linear layer of a checkpoint is quantized, and which layers stay float.

    Attributes:
      weight_granularity: "per_tensor" (`weight_scale` scalar or `(1,)`) or "per_channel" (`(N, 1)`).
      activation_scheme: "static" (`input_scale` per layer), "dynamic_per_tensor" or "dynamic_per_token".
      ignore: checkpoint prefixes of linear layers left in float.
      targets: the compressed-tensors group's targets: `("Linear",)` (every linear layer not in
        `ignore`, as llm-compressor writes it) or the quantized layers' prefixes, which `quantize`
        writes so that no linear layer the file does not hold (a decoder tied to the embedding)
        is taken for an fp8 one.
      form: "compressed-tensors" (what None means) or "fp8" (vLLM only; per-tensor weights with
        static or dynamic per-tensor activations).
      scheme: an `Fp8Scheme` instead of weight_granularity and activation_scheme (a field given as
        well must agree); after construction it always holds the checkpoint's scheme.
    """

    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    ignore: tuple[str, ...] = ()
    form: ConfigForm | None = None
    targets: tuple[str, ...] = ("Linear",)
    scheme: Fp8Scheme | None = None

    def __post_init__(self):
        scheme = scheme_lib.merge(
            self.scheme, weight_granularity=self.weight_granularity, activation_scheme=self.activation_scheme
        )
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "weight_granularity", scheme.weight_granularity)
        object.__setattr__(self, "activation_scheme", scheme.activation_scheme)
        if self.form is None:
            object.__setattr__(self, "form", "compressed-tensors")
        if self.form not in CONFIG_FORMS:
            raise ValueError(f"form must be one of {CONFIG_FORMS}, got {self.form!r}")
        if self.form == "fp8" and not self.fp8_form_holds(self.scheme):
            raise ValueError(
                "the 'fp8' quantization_config form holds per-tensor weights with static or dynamic per-tensor "
                f"activations only, got weight_granularity={self.weight_granularity!r}, "
                f"activation_scheme={self.activation_scheme!r}; use form='compressed-tensors'"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("targets must name at least one module (or 'Linear')")

    @staticmethod
    def fp8_form_holds(scheme: Fp8Scheme) -> bool:
        """Whether the "fp8" form can express `scheme` (per-tensor weights, per-tensor activations)."""
        return scheme.weight_granularity == "per_tensor" and scheme.activation_scheme != "dynamic_per_token"

    @property
    def is_static(self) -> bool:
        return self.activation_scheme == "static"

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of `config.json`."""
        if self.form == "fp8":
            return {
                "quant_method": "fp8",
                "activation_scheme": "static" if self.is_static else "dynamic",
                "ignored_layers": list(self.ignore),
            }
        weight_strategy = {v: k for k, v in _CT_WEIGHT_STRATEGY.items()}[self.weight_granularity]
        input_strategy, input_dynamic = {v: k for k, v in _CT_INPUT_STRATEGY.items()}[self.activation_scheme]

        def args(strategy: str, dynamic: bool) -> dict[str, Any]:
            return {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "strategy": strategy,
                "dynamic": dynamic,
                "group_size": None,
                "block_structure": None,
                "actorder": None,
                "observer": None if dynamic else "minmax",
                "observer_kwargs": {},
            }

        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": list(self.targets),
                    "weights": args(weight_strategy, False),
                    "input_activations": args(input_strategy, input_dynamic),
                    "output_activations": None,
                    "format": "float-quantized",
                }
            },
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "QuantizationConfig":
        """Reads either form; ValueError or NotImplementedError on anything these layers cannot run.

        The fp8 form's `"activation_scheme": "dynamic"` reads as "dynamic_per_tensor" (vLLM may pick
        per-token at run time; the checkpoint holds no activation scales either way).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"quantization_config must be a JSON object, got {type(config).__name__}")
        method = config.get("quant_method")
        if method == "fp8":
            activation = config.get("activation_scheme", "dynamic")
            if activation not in ("static", "dynamic"):
                raise ValueError(
                    f"quantization_config.activation_scheme must be 'static' or 'dynamic', got {activation!r}"
                )
            if config.get("weight_block_size") is not None:
                raise NotImplementedError(
                    f"block-wise fp8 weights (weight_block_size={config['weight_block_size']}) are not supported"
                )
            return cls(
                "per_tensor",
                "static" if activation == "static" else "dynamic_per_tensor",
                _names(config, "ignored_layers"),
                "fp8",
            )
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(config)
        raise ValueError(f"quantization_config.quant_method must be 'fp8' or 'compressed-tensors', got {method!r}")

    @classmethod
    def _from_compressed_tensors(cls, config: Mapping[str, Any]):
        groups = config.get("config_groups") or {}
        if not isinstance(groups, Mapping):
            raise ValueError(
                f"quantization_config.config_groups must be a JSON object of named groups, got {type(groups).__name__}"
            )
        if len(groups) != 1:
            raise NotImplementedError(
                f"compressed-tensors checkpoints with exactly one config group are supported, got {len(groups)}"
            )
        ((name, group),) = groups.items()
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {type(group).__name__}")
        weights, inputs = group.get("weights"), group.get("input_activations")
        if not weights or not inputs:
            raise NotImplementedError(f"{where} must quantize both weights and input_activations (W8A8)")
        for kind, args in (("weights", weights), ("input_activations", inputs)):
            if not isinstance(args, Mapping):
                raise ValueError(f"{where}.{kind} must be a JSON object, got {type(args).__name__}")
            if args.get("num_bits") != 8 or args.get("type") != "float":
                raise NotImplementedError(
                    f"{where}.{kind} must be 8-bit float, got num_bits={args.get('num_bits')}, type={args.get('type')!r}"
                )
            if args.get("symmetric") is False:
                raise NotImplementedError(f"{where}.{kind}: asymmetric fp8 is not supported")
        weight_strategy = str(weights.get("strategy", "")).lower()
        if weight_strategy not in _CT_WEIGHT_STRATEGY or weights.get("dynamic"):
            raise NotImplementedError(
                f"{where}.weights.strategy must be 'tensor' or 'channel' (static), got {weights.get('strategy')!r}"
            )
        input_key = (str(inputs.get("strategy", "")).lower(), bool(inputs.get("dynamic")))
        if input_key not in _CT_INPUT_STRATEGY:
            raise NotImplementedError(
                f"{where}.input_activations must be tensor (static or dynamic) or token (dynamic), got "
                f"strategy={inputs.get('strategy')!r}, dynamic={inputs.get('dynamic')!r}"
            )
        return cls(
            _CT_WEIGHT_STRATEGY[weight_strategy],
            _CT_INPUT_STRATEGY[input_key],
            _names(config, "ignore"),
            "compressed-tensors",
            targets=_names(group, "targets", where) or ("Linear",),
        )


def _names(config: Mapping[str, Any], key: str, where: str = "quantization_config") -> tuple[str, ...]:
    """A list of layer names (`ignore`, `targets`), checked."""
    names = config.get(key) or ()
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}.{key} must be a list of layer names, got {names!r}")
    return tuple(names)


def with_quantization_config(model_config: Mapping[str, Any] | None, config: QuantizationConfig) -> dict[str, Any]:
    """A copy of a model's `config.json` contents with `config` as its `quantization_config`."""
    return {**(model_config or {}), "quantization_config": config.to_dict()}
