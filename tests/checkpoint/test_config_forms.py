"""quantization_config: both forms vLLM reads, written by hand, and our writer's round trip."""

import pytest

from tests.checkpoint.conftest import CONFIGS
from w8a8_jax.checkpoint import QuantizationConfig


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
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, NotImplementedError, "block"),
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
