"""Conversion rules, fused shards, static calibration and the per-layer report (nnx and linen)."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests import reference
from w8a8_jax import convert, dense
from w8a8_jax import linen as fp8_linen
from w8a8_jax import nnx as fp8_nnx

FP8 = ml_dtypes.float8_e4m3fn


class Model(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(32, 48, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(48, 48, rngs=rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(48, 16, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.up(x))
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.lm_head(x)


def batches(key, count, shape=(6, 32)):
    return [jax.random.normal(k, shape, jnp.float32) * 2 for k in jax.random.split(key, count)]


def test_docstring_examples():
    for module in (fp8_linen, fp8_nnx):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_rules_first_match_wins_and_unmatched_stay_float(key):
    model = Model(nnx.Rngs(0))
    rules = [
        convert.QuantizationRule("lm_head", quantize=False),
        convert.QuantizationRule(r"layers/1", weight_granularity="per_tensor", activation_scheme="dynamic_per_tensor"),
        convert.QuantizationRule(r"layers/\d+"),  # layers/1 matched above: this rule only takes layers/0
    ]
    convert.quantize_nnx(model, rules)
    assert isinstance(model.lm_head, nnx.Linear) and isinstance(model.up, nnx.Linear)  # up: no rule matches
    assert model.layers[1].scheme == dense.Fp8Scheme("per_tensor", "dynamic_per_tensor")
    assert model.layers[0].scheme == dense.Fp8Scheme()
    assert model.layers[0].weight_scale[...].shape == (48, 1)
    assert convert.find_rule(rules, "xlayers/0") is None  # fullmatch, not search


def test_static_calibration_and_report_nnx(key):
    model = Model(nnx.Rngs(1))
    data = batches(key, 3)
    float_model = nnx.clone(model)
    # Float inputs of layers/0, computed independently in NumPy (float64) to check amax.
    up_kernel, up_bias = np.asarray(model.up.kernel[...], np.float64), np.asarray(model.up.bias[...], np.float64)
    layer_inputs = [np.maximum(np.asarray(x, np.float64) @ up_kernel + up_bias, 0) for x in data]
    rules = [
        convert.QuantizationRule("layers/0", weight_granularity="per_tensor", activation_scheme="static"),
        convert.QuantizationRule("up"),
    ]
    report = convert.quantize_nnx(model, rules, calibration_data=data)
    row = report["layers/0"]
    amax = max(np.abs(x).max() for x in layer_inputs)
    # float32 layer vs float64 NumPy input: amax agrees to float32 rounding of a K=32 dot.
    np.testing.assert_allclose(row.input_amax, amax, rtol=1e-5)
    np.testing.assert_allclose(row.input_scale, row.input_amax / 448.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.layers[0].input_scale[...]), [row.input_scale], rtol=1e-7)
    assert row.saturated_fraction == 0.0  # the scale came from the same batches' amax

    # SQNR and max relative error recomputed in float64 from the two models' layer outputs.
    w = model.layers[0]
    kernel = np.asarray(float_model.layers[0].kernel[...], np.float64)
    bias = np.asarray(float_model.layers[0].bias[...], np.float64)
    signal = noise = max_err = max_ref = 0.0
    for x in layer_inputs:
        y = x @ kernel + bias
        y_fp8 = np.asarray(w(jnp.asarray(x, jnp.float32)), np.float64)
        signal, noise = signal + (y**2).sum(), noise + ((y_fp8 - y) ** 2).sum()
        max_err, max_ref = max(max_err, np.abs(y_fp8 - y).max()), max(max_ref, np.abs(y).max())
    # The report sums float32 values of float32 layers; 0.05 dB and 1e-3 cover that.
    assert abs(row.sqnr_db - 10 * np.log10(signal / noise)) < 0.05
    np.testing.assert_allclose(row.max_rel_error, max_err / max_ref, rtol=1e-3)
    # fp8 e4m3 keeps 3 mantissa bits: about 6% per value, ~25-30 dB over a layer.
    assert 20 < row.sqnr_db < 40
    table = str(report)
    assert "layers/0" in table and "SQNR dB" in table and len(table.splitlines()) == 4


def test_static_without_data_is_an_error():
    with pytest.raises(ValueError, match="calibration_data"):
        convert.quantize_nnx(Model(nnx.Rngs(0)), [convert.QuantizationRule(activation_scheme="static")])


def test_report_counts_saturation_with_scale_ub(key):
    model = Model(nnx.Rngs(2))
    data = batches(key, 2)
    x = np.concatenate([np.asarray(b) for b in data])
    report = convert.quantize_nnx(model, [convert.QuantizationRule("up", scale_ub=1.0)], calibration_data=data)
    np.testing.assert_allclose(report["up"].saturated_fraction, (np.abs(x) > 1.0).mean(), rtol=1e-6)


@pytest.mark.parametrize("weight_granularity", ["per_tensor", "per_channel"])
def test_fused_shards_follow_vllm(key, weight_granularity):
    """QKV with its own scale per shard: max-scale requantization, or scales expanded per channel."""
    widths = (32, 16, 16)
    kernel = np.array(jax.random.normal(key, (24, sum(widths)), jnp.float32))
    kernel[:, 32:48] *= 4  # shards with different ranges, so their scales differ
    params = dense.fp8_params(jnp.asarray(kernel), scheme=dense.Fp8Scheme(weight_granularity), shard_widths=widths)
    shards = [reference.quant_dynamic_per_tensor(part.T) for part in np.split(kernel, np.cumsum(widths)[:-1], axis=1)]
    scales = np.concatenate([s for _, s in shards])
    if weight_granularity == "per_tensor":
        max_scale = scales.max()
        dequantized = np.concatenate([c.astype(np.float32) * s for c, s in shards])
        codes = reference.quant_static(dequantized, max_scale)
        expected_scale = np.array([max_scale], np.float32)
    else:
        codes = np.concatenate([c for c, _ in shards])
        expected_scale = np.repeat(scales, widths)[:, None]
    np.testing.assert_array_equal(np.asarray(params["weight"]).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(params["weight_scale"]), expected_scale)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(48, name="up")(x))
        x = jax.nn.relu(nn.Dense(48)(x))
        return nn.Dense(16, name="lm_head")(x)


def test_linen_conversion_calibration_and_report(key):
    model = LinenModel()
    data = batches(key, 2)
    variables = model.init(jax.random.key(0), data[0])
    rules = [
        convert.QuantizationRule("lm_head", quantize=False),
        convert.QuantizationRule("Dense_0", activation_scheme="static", weight_granularity="per_tensor"),
        convert.QuantizationRule(),
    ]
    fp8_model, fp8_variables, report = convert.quantize_linen(model, variables, rules, data)
    params = fp8_variables["params"]
    assert set(params["lm_head"]) == {"kernel", "bias"}
    assert params["up"]["weight"].dtype == FP8 and params["up"]["weight_scale"].shape == (48, 1)
    assert params["Dense_0"]["weight_scale"].shape == (1,)
    p = variables["params"]
    hidden = [
        np.maximum(
            np.asarray(x, np.float64) @ np.asarray(p["up"]["kernel"], np.float64) + np.asarray(p["up"]["bias"]), 0
        )
        for x in data
    ]
    amax = max(np.abs(h).max() for h in hidden)
    np.testing.assert_allclose(report["Dense_0"].input_amax, amax, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(params["Dense_0"]["input_scale"]), [report["Dense_0"].input_scale], rtol=1e-7)
    assert [row.path for row in report.layers] == ["up", "Dense_0"]
    out = jax.jit(fp8_model.apply)(fp8_variables, data[0])
    ref = model.apply(variables, data[0])
    # A 3-layer fp8 stack: each layer adds ~3% relative error (SQNR ~ 30 dB).
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.15 * np.abs(np.asarray(ref)).max()
    # The intercepted Dense is exactly an Fp8Dense on the same parameters.
    single = nn.Dense(48)
    single_vars = {"params": p["up"]}
    fp8_single, fp8_single_vars, _ = convert.quantize_linen(
        single, single_vars, [convert.QuantizationRule()], data[:1], report=False
    )
    np.testing.assert_array_equal(
        np.asarray(fp8_single.apply(fp8_single_vars, data[1])),
        np.asarray(fp8_linen.Fp8Dense(48).apply(fp8_single_vars, data[1])),
    )


def test_linen_scan_stack_converts_per_slice(key):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jax.nn.relu(nn.Dense(32)(x)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    x = jax.random.normal(key, (4, 32), jnp.float32)
    variables = stack.init(jax.random.key(1), x, None)
    fp8_model, fp8_variables, report = convert.quantize_linen(
        stack, variables, [convert.QuantizationRule()], [(x, None)]
    )
    assert fp8_variables["params"]["Dense_0"]["weight"].shape == (3, 32, 32)
    assert report.layers == ()  # scanned layers are converted but not observed
    out, _ = jax.jit(fp8_model.apply)(fp8_variables, x, None)
    expected = x
    for i in range(3):
        layer_params = jax.tree.map(lambda a, i=i: a[i], fp8_variables["params"]["Dense_0"])
        expected = jax.nn.relu(fp8_linen.Fp8Dense(32).apply({"params": layer_params}, expected))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)
