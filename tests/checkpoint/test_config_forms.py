"""quantization_config: both forms vLLM reads, written by hand, and our writer's round trip."""

import pytest

from tests.checkpoint.conftest import CONFIGS, FP8_FORM_BLOCK, compressed_tensors, compressed_tensors_block
from w8a8_jax.checkpoint import QuantizationConfig
from w8a8_jax.scheme import Fp8Scheme


@pytest.mark.parametrize("granularity,scheme", list(CONFIGS))
def test_reads_hand_written_configs(granularity, scheme):
    config = QuantizationConfig.from_dict(CONFIGS[granularity, scheme])
    assert (config.weight_granularity, config.activation_scheme) == (granularity, scheme)
    assert config.ignore == ("lm_head",) or CONFIGS[granularity, scheme].get("ignored_layers") is None


def test_fp8_form_dynamic_reads_as_per_tensor():
    config = QuantizationConfig.from_dict({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert (config.weight_granularity, config.activation_scheme, config.form) == (
        "per_tensor",
        "dynamic_per_tensor",
        "fp8",
    )


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("scheme", ["static", "dynamic_per_tensor", "dynamic_per_token"])
@pytest.mark.parametrize("form", [None, "fp8", "compressed-tensors"])
def test_round_trip(granularity, scheme, form):
    fits_fp8 = granularity == "per_tensor" and scheme != "dynamic_per_token"
    if form == "fp8" and not fits_fp8:
        with pytest.raises(ValueError, match="compressed-tensors"):
            QuantizationConfig(granularity, scheme, form=form)
        return
    config = QuantizationConfig(granularity, scheme, ignore=("lm_head", "pooler.dense"), form=form)
    assert config.form == (form or "compressed-tensors")  # the form transformers reads too is the default
    assert QuantizationConfig.fp8_form_holds(config.scheme) == fits_fp8
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    if config.form == "compressed-tensors":
        named = QuantizationConfig(granularity, scheme, targets=("model.layers.0.q_proj", "lm_head"))
        assert named.to_dict()["config_groups"]["group_0"]["targets"] == ["model.layers.0.q_proj", "lm_head"]
        assert QuantizationConfig.from_dict(named.to_dict()) == named


@pytest.mark.parametrize(
    "config,error,match",
    [
        ({"quant_method": "gptq"}, ValueError, "quant_method"),
        ({"quant_method": "fp8", "activation_scheme": "per_token"}, ValueError, "activation_scheme"),
        (
            {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
            ValueError,
            r"activation_scheme must be 'dynamic' with weight_block_size",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128]}, ValueError, r"weight_block_size must be two ints"),
        ({"quant_method": "fp8", "weight_block_size": [128, 0]}, ValueError, r"weight_block_size must be two ints"),
        ({"quant_method": "fp8", "weight_block_size": "128"}, ValueError, r"weight_block_size must be two ints"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
            NotImplementedError,
            r"scale_fmt='ue8m0'",
        ),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": "lm_head"},
            ValueError,
            "modules_to_not_convert must be a list",
        ),
        ({"quant_method": "compressed-tensors", "config_groups": {}}, NotImplementedError, "one config group"),
        ({"quant_method": "compressed-tensors", "config_groups": [{"weights": {}}]}, ValueError, "config_groups must"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": "x"}}, ValueError, "config_groups.g must"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": "fp8", "input_activations": {"num_bits": 8}}},
            },
            ValueError,
            "config_groups.g.weights must be a JSON object",
        ),
        ({"quant_method": "fp8", "ignored_layers": "lm_head"}, ValueError, "ignored_layers must be a list"),
        ("fp8", TypeError, "JSON object"),
    ],
)
def test_rejects(config, error, match):
    with pytest.raises(error, match=match):
        QuantizationConfig.from_dict(config)


@pytest.mark.parametrize(
    "weights,inputs,match",
    [
        ({"num_bits": 4, "type": "int", "strategy": "channel"}, {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}, "8-bit float"),
        ({"num_bits": 8, "type": "float", "strategy": "group"}, {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}, "weights.strategy"),
        ({"num_bits": 8, "type": "float", "strategy": "channel"}, {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": False}, "input_activations"),
        ({"num_bits": 8, "type": "float", "strategy": "channel"}, None, "W8A8"),
    ],
)  # fmt: skip
def test_rejects_compressed_tensors_schemes(weights, inputs, match):
    config = {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
    }
    with pytest.raises(NotImplementedError, match=match):
        QuantizationConfig.from_dict(config)


# ----------------------------------------------------------------------------------------------
# Block weights


def test_reads_deepseek_v3_config():
    """DeepSeek-V3's quantization_config, as its config.json has it (no skip list: every linear layer is fp8)."""
    config = QuantizationConfig.from_dict(
        {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    )
    assert (config.form, config.weight_granularity, config.activation_scheme) == (
        "fp8",
        "block",
        "dynamic_per_token_group",
    )
    assert config.block_size == config.scheme.block_size == (128, 128) and config.ignore == ()
    assert config.weight_scale_name == "weight_scale_inv"


@pytest.mark.parametrize(
    "keys,ignore",
    [
        ({"modules_to_not_convert": ["lm_head", "mlp.gate"]}, ("lm_head", "mlp.gate")),
        ({"ignored_layers": ["lm_head"]}, ("lm_head",)),  # MiniMax's and vLLM's key
        ({"modules_to_not_convert": ["lm_head"], "ignored_layers": ["mlp.gate", "lm_head"]}, ("lm_head", "mlp.gate")),
        ({"modules_to_not_convert": None, "ignored_layers": None}, ()),
    ],
)
def test_fp8_form_skip_list_reads_both_keys(keys, ignore):
    config = QuantizationConfig.from_dict({**FP8_FORM_BLOCK, "modules_to_not_convert": None, **keys})
    assert config.ignore == ignore


def test_reads_llm_compressor_fp8_block_config():
    config = QuantizationConfig.from_dict(compressed_tensors_block((64, 32)))
    assert (config.form, config.weight_granularity, config.activation_scheme, config.block_size) == (
        "compressed-tensors",
        "block",
        "dynamic_per_token_group",
        (64, 32),
    )
    assert config.weight_scale_name == "weight_scale" and config.ignore == ("lm_head",)
    legacy = compressed_tensors_block((64, 32))
    legacy["config_groups"]["group_0"]["weights"]["block_structure"] = "64x32"  # an older spelling it reads
    assert QuantizationConfig.from_dict(legacy) == config


@pytest.mark.parametrize("block_size", [None, (128, 128), (64, 32), (1, 7)])
@pytest.mark.parametrize("form", ["fp8", "compressed-tensors"])
def test_block_round_trip(form, block_size):
    config = QuantizationConfig("block", ignore=("lm_head", "mlp.gate"), form=form, block_size=block_size)
    assert config.block_size == (block_size or (128, 128)) and config.activation_scheme == "dynamic_per_token_group"
    assert QuantizationConfig.fp8_form_holds(config.scheme)
    written = config.to_dict()
    assert QuantizationConfig.from_dict(written) == config
    bn, bk = config.block_size
    if form == "fp8":
        # transformers reads `modules_to_not_convert`, vLLM `ignored_layers` first: both hold the list.
        assert written == {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [bn, bk],
            "modules_to_not_convert": ["lm_head", "mlp.gate"],
            "ignored_layers": ["lm_head", "mlp.gate"],
        }
    else:
        group = written["config_groups"]["group_0"]
        assert group["weights"]["strategy"] == "block" and group["weights"]["block_structure"] == [bn, bk]
        assert group["weights"]["dynamic"] is False and group["weights"]["group_size"] is None
        inputs = group["input_activations"]
        assert (inputs["strategy"], inputs["dynamic"], inputs["group_size"], inputs["block_structure"]) == (
            "group",
            True,
            bk,
            None,
        )


def test_block_scheme_and_fields_agree():
    scheme = Fp8Scheme("block", block_size=(64, 64))
    assert QuantizationConfig(scheme=scheme).block_size == (64, 64)
    assert QuantizationConfig(scheme=scheme, block_size=(64, 64)) == QuantizationConfig("block", block_size=(64, 64))
    with pytest.raises(ValueError, match=r"block_size=\(32, 32\) contradicts scheme.block_size=\(64, 64\)"):
        QuantizationConfig(scheme=scheme, block_size=(32, 32))
    with pytest.raises(ValueError, match="block_size applies only to weight_granularity='block'"):
        QuantizationConfig("per_channel", block_size=(64, 64))
    for activations in ("static", "dynamic_per_tensor"):
        with pytest.raises(ValueError, match="block weights quantize their activations per token group"):
            QuantizationConfig("block", activations)
    assert QuantizationConfig(scheme=scheme).weight_scale_name == "weight_scale"
    assert QuantizationConfig(scheme=scheme, form="fp8").weight_scale_name == "weight_scale_inv"
    assert QuantizationConfig("per_tensor", "static", form="fp8").weight_scale_name == "weight_scale"


def _group(weights_strategy, inputs_strategy, dynamic=True, block=(128, 128), group_size=128):
    config = compressed_tensors(weights_strategy, inputs_strategy, dynamic)
    group = config["config_groups"]["group_0"]
    group["weights"]["block_structure"] = None if block is None else list(block)
    group["input_activations"]["group_size"] = group_size
    return config


@pytest.mark.parametrize(
    "config,error,match",
    [
        (_group("block", "token"), ValueError, r"block weights go with dynamic group activations"),
        (_group("block", "tensor", dynamic=False), ValueError, r"block weights go with dynamic group activations"),
        (_group("channel", "group", block=None), ValueError, r"group activations with block weights"),
        (_group("block", "group", dynamic=False), NotImplementedError, r"input_activations must be"),
        (_group("block", "group", block=None), ValueError, r"weights.block_structure must be two ints"),
        (_group("block", "group", block=(128,)), ValueError, r"weights.block_structure must be two ints"),
        (_group("block", "group", group_size=64), ValueError, r"group_size must be the weight block's bk=128"),
        (_group("block", "group", group_size=None), ValueError, r"group_size must be the weight block's bk=128"),
    ],
)
def test_rejects_inconsistent_block_groups(config, error, match):
    with pytest.raises(error, match=match):
        QuantizationConfig.from_dict(config)
