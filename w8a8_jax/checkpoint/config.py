"""The `quantization_config` of an FP8 checkpoint, in both forms vLLM reads.

The compressed-tensors form (`"quant_method": "compressed-tensors"`, `"format": "float-quantized"`,
llm-compressor's output) holds per-tensor, per-channel or block weight scales (`weight_scale`) and
static, dynamic per-tensor, dynamic per-token or (with block weights) dynamic per-token-group
activations; vLLM and transformers both load it, so we write it by default.

`"quant_method": "fp8"` (vLLM's own form) holds either per-tensor weight scales (`weight_scale`)
with a static or dynamic activation scheme, or, with `"weight_block_size": [bn, bk]`, block scales
stored as `weight_scale_inv` with dynamic per-token-group activations (DeepSeek-V3's and
Qwen3-FP8's checkpoints, transformers' FineGrainedFP8). vLLM loads both; transformers reads every
fp8-form checkpoint as block-scaled (`weight_scale_inv`), so it drops a per-tensor `weight_scale`.
Both forms map onto one `QuantizationConfig`.
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
    ("group", True): "dynamic_per_token_group",
}
# The skip list of the fp8 form: transformers' FineGrainedFP8Config reads `modules_to_not_convert`
# (`ignored_layers` only when that is absent), vLLM's Fp8Config `ignored_layers` (falling back to
# `modules_to_not_convert`). The block form writes both, with one list; reading takes their union.
FP8_FORM_IGNORE_KEYS = ("modules_to_not_convert", "ignored_layers")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How every fp8 linear layer of a checkpoint is quantized, and which layers stay float.

    Attributes:
      weight_granularity: "per_tensor" (`weight_scale` scalar or `(1,)`), "per_channel" (`(N, 1)`)
        or "block" (`(ceil(N / bn), ceil(K / bk))`, named `weight_scale_inv` in the fp8 form).
      activation_scheme: "static" (`input_scale` per layer), "dynamic_per_tensor",
        "dynamic_per_token" or, with block weights (and only with them),
        "dynamic_per_token_group" (what "dynamic_per_token", the default, reads as there).
      ignore: checkpoint prefixes of linear layers left in float.
      targets: the compressed-tensors group's targets: `("Linear",)` (every linear layer not in
        `ignore`, as llm-compressor writes it) or the quantized layers' prefixes, which `quantize`
        writes so that no linear layer the file does not hold (a decoder tied to the embedding)
        is taken for an fp8 one.
      form: "compressed-tensors" (what None means) or "fp8" (per-tensor weights with static or
        dynamic per-tensor activations, read by vLLM only; or block weights, read by vLLM and
        transformers).
      block_size: `(bn, bk)` of block weights (default (128, 128)); None for the others.
      scheme: an `Fp8Scheme` instead of weight_granularity, activation_scheme and block_size (a
        field given as well must agree); after construction it always holds the checkpoint's scheme.
    """

    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    ignore: tuple[str, ...] = ()
    form: ConfigForm | None = None
    targets: tuple[str, ...] = ("Linear",)
    scheme: Fp8Scheme | None = None
    block_size: tuple[int, int] | None = None

    def __post_init__(self):
        scheme = scheme_lib.merge(
            self.scheme,
            weight_granularity=self.weight_granularity,
            activation_scheme=self.activation_scheme,
            block_size=self.block_size,
        )
        object.__setattr__(self, "scheme", scheme)
        for name in ("weight_granularity", "activation_scheme", "block_size"):
            object.__setattr__(self, name, getattr(scheme, name))
        if self.form is None:
            object.__setattr__(self, "form", "compressed-tensors")
        if self.form not in CONFIG_FORMS:
            raise ValueError(f"form must be one of {CONFIG_FORMS}, got {self.form!r}")
        if self.form == "fp8" and not self.fp8_form_holds(self.scheme):
            raise ValueError(
                "the 'fp8' quantization_config form holds per-tensor weights with static or dynamic per-tensor "
                "activations, or block weights with dynamic per-token-group activations, got "
                f"weight_granularity={self.weight_granularity!r}, activation_scheme={self.activation_scheme!r}; "
                "use form='compressed-tensors'"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("targets must name at least one module (or 'Linear')")

    @staticmethod
    def fp8_form_holds(scheme: Fp8Scheme) -> bool:
        """Whether the "fp8" form can express `scheme`: per-tensor weights with per-tensor
        activations, or block weights (whose activations are always per token group)."""
        if scheme.is_block:
            return True
        return scheme.weight_granularity == "per_tensor" and scheme.activation_scheme != "dynamic_per_token"

    @property
    def is_static(self) -> bool:
        return self.activation_scheme == "static"

    @property
    def is_block(self) -> bool:
        return self.weight_granularity == "block"

    @property
    def weight_scale_name(self) -> str:
        """The leaf name of a layer's weight scale tensor: "weight_scale_inv" in the fp8 form's
        block layout (DeepSeek-V3's name: it is the multiplier all the same), else "weight_scale"."""
        return "weight_scale_inv" if self.form == "fp8" and self.is_block else "weight_scale"

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of `config.json`."""
        if self.form == "fp8":
            return self._fp8_form_dict()
        weight_strategy = {v: k for k, v in _CT_WEIGHT_STRATEGY.items()}[self.weight_granularity]
        input_strategy, input_dynamic = {v: k for k, v in _CT_INPUT_STRATEGY.items()}[self.activation_scheme]

        def args(strategy: str, dynamic: bool, **fields) -> dict[str, Any]:
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
                **fields,
            }

        weight_fields, input_fields = {}, {}
        if self.is_block:
            # compressed-tensors' FP8_BLOCK scheme: static block weights, dynamic activations in
            # groups of the block's bk along K.
            weight_fields = {"block_structure": list(self.block_size)}
            input_fields = {"group_size": self.block_size[1]}
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": list(self.targets),
                    "weights": args(weight_strategy, False, **weight_fields),
                    "input_activations": args(input_strategy, input_dynamic, **input_fields),
                    "output_activations": None,
                    "format": "float-quantized",
                }
            },
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
        }

    def _fp8_form_dict(self) -> dict[str, Any]:
        if not self.is_block:
            return {
                "quant_method": "fp8",
                "activation_scheme": "static" if self.is_static else "dynamic",
                "ignored_layers": list(self.ignore),
            }
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block_size),
            **{key: list(self.ignore) for key in FP8_FORM_IGNORE_KEYS},
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "QuantizationConfig":
        """Reads either form; ValueError or NotImplementedError on anything these layers cannot run.

        The fp8 form's `"activation_scheme": "dynamic"` reads as "dynamic_per_tensor" (vLLM may pick
        per-token at run time; the checkpoint holds no activation scales either way), or with
        `weight_block_size` as "dynamic_per_token_group".
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"quantization_config must be a JSON object, got {type(config).__name__}")
        method = config.get("quant_method")
        if method == "fp8":
            return cls._from_fp8_form(config)
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(config)
        raise ValueError(f"quantization_config.quant_method must be 'fp8' or 'compressed-tensors', got {method!r}")

    @classmethod
    def _from_fp8_form(cls, config: Mapping[str, Any]) -> "QuantizationConfig":
        activation = config.get("activation_scheme", "dynamic")
        if activation not in ("static", "dynamic"):
            raise ValueError(f"quantization_config.activation_scheme must be 'static' or 'dynamic', got {activation!r}")
        ignore = _union(*(_names(config, key) for key in FP8_FORM_IGNORE_KEYS))
        block_size = config.get("weight_block_size")
        if block_size is None:
            return cls("per_tensor", "static" if activation == "static" else "dynamic_per_tensor", ignore, "fp8")
        try:
            block_size = scheme_lib.check_block_size(block_size)
        except ValueError:
            raise ValueError(
                f"quantization_config.weight_block_size must be two ints >= 1, [bn, bk], got {block_size!r}"
            ) from None
        if activation != "dynamic":
            raise ValueError(
                "quantization_config.activation_scheme must be 'dynamic' with weight_block_size (block weights "
                f"quantize their activations per token group), got {activation!r}"
            )
        scale_format = config.get("scale_fmt", "float")
        if scale_format not in (None, "float"):
            raise NotImplementedError(
                f"quantization_config.scale_fmt={scale_format!r}: only float32 block scales ('float') are supported"
            )
        return cls("block", "dynamic_per_token_group", ignore, "fp8", block_size=block_size)

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
                f"{where}.weights.strategy must be 'tensor', 'channel' or 'block' (static), got "
                f"{weights.get('strategy')!r}"
            )
        input_key = (str(inputs.get("strategy", "")).lower(), inputs.get("dynamic") is True)
        if input_key not in _CT_INPUT_STRATEGY:
            raise NotImplementedError(
                f"{where}.input_activations must be tensor (static or dynamic), token (dynamic) or group (dynamic, "
                f"with block weights), got strategy={inputs.get('strategy')!r}, dynamic={inputs.get('dynamic')!r}"
            )
        granularity, activations = _CT_WEIGHT_STRATEGY[weight_strategy], _CT_INPUT_STRATEGY[input_key]
        block_size = None
        if granularity == "block" or activations == "dynamic_per_token_group":
            block_size = _ct_block_size(weights, inputs, where, granularity, activations)
        return cls(
            granularity,
            activations,
            _names(config, "ignore"),
            "compressed-tensors",
            targets=_names(group, "targets", where) or ("Linear",),
            block_size=block_size,
        )


def _ct_block_size(weights: Mapping[str, Any], inputs: Mapping[str, Any], where: str, granularity, activations):
    """The `(bn, bk)` of a compressed-tensors block group: block weights (`block_structure`) with
    dynamic activations in groups of bk (`group_size`), the one block scheme these layers run."""
    if granularity != "block" or activations != "dynamic_per_token_group":
        raise ValueError(
            f"{where}: block weights go with dynamic group activations (input_activations strategy 'group', "
            f"dynamic, group_size = the block's bk) and group activations with block weights, got weights "
            f"strategy={weights.get('strategy')!r}, input_activations strategy={inputs.get('strategy')!r} "
            f"dynamic={inputs.get('dynamic')!r}"
        )
    structure = weights.get("block_structure")
    try:
        if isinstance(structure, str):  # compressed-tensors also reads an older "128x128" spelling
            structure = [int(part) for part in structure.lower().split("x")]
        bn, bk = scheme_lib.check_block_size(structure)
    except ValueError:
        raise ValueError(
            f"{where}.weights.block_structure must be two ints >= 1, [bn, bk], got {weights.get('block_structure')!r}"
        ) from None
    group_size = inputs.get("group_size")
    if isinstance(group_size, bool) or group_size != bk:
        raise ValueError(
            f"{where}.input_activations.group_size must be the weight block's bk={bk} (block_structure "
            f"{[bn, bk]}), got {group_size!r}"
        )
    return bn, bk


def _union(*lists: tuple[str, ...]) -> tuple[str, ...]:
    """The names of every list, each once, in order of first appearance."""
    return tuple(dict.fromkeys(name for names in lists for name in names))


def _names(config: Mapping[str, Any], key: str, where: str = "quantization_config") -> tuple[str, ...]:
    """A list of layer names (`ignore`, `targets`), checked."""
    names = config.get(key) or ()
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}.{key} must be a list of layer names, got {names!r}")
    return tuple(names)


def with_quantization_config(model_config: Mapping[str, Any] | None, config: QuantizationConfig) -> dict[str, Any]:
    """A copy of a model's `config.json` contents with `config` as its `quantization_config`."""
    return {**(model_config or {}), "quantization_config": config.to_dict()}
