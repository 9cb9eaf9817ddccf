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
from w8a8_jax import Fp8Params, Fp8Scheme, convert, weight_utils
from w8a8_jax import linen as fp8_linen
from w8a8_jax import nnx as fp8_nnx

FP8 = ml_dtypes.float8_e4m3fn


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """The float layers that calibrate run in full float32, so their amax matches float64 NumPy to
    float32 rounding on every backend (GPUs default to TF32 matmuls, 10-bit mantissas)."""
    with jax.default_matmul_precision("float32"):
        yield


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
    assert model.layers[1].scheme == Fp8Scheme("per_tensor", "dynamic_per_tensor", fp8_dtype=FP8)
    assert model.layers[0].scheme == Fp8Scheme(fp8_dtype=FP8)
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
    params = Fp8Params.from_float(jnp.asarray(kernel), scheme=Fp8Scheme(weight_granularity), shard_widths=widths)
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
    np.testing.assert_array_equal(np.asarray(params.weight).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(params.weight_scale), expected_scale)


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


class ScannedStack(nnx.Module):
    """Three `nnx.Linear` layers stacked by `nnx.vmap` (weights `(3, K, N)`), run by `nnx.scan`.

    Every layer sees the same input and the scan returns each layer's output `(3, M, N)`, so each
    slice can be checked on its own.
    """

    def __init__(self, key, k, n):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(layer_key):
            return nnx.Linear(k, n, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(layer_key))

        self.layers = make(jax.random.split(key, 3))

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
        def run(layer, x):
            return x, layer(x)

        return run(self.layers, x)[1]


def reference_activation(x, activation_scheme):
    if activation_scheme == "dynamic_per_tensor":
        return reference.quant_dynamic_per_tensor(x)
    return reference.quant_dynamic_per_token(x)


@pytest.mark.parametrize(
    "weight_granularity,activation_scheme", [("per_tensor", "dynamic_per_tensor"), ("per_channel", "dynamic_per_token")]
)
def test_nnx_scan_stack_converts_per_slice(key, weight_granularity, activation_scheme):
    k, n = 40, 24
    k_model, k_x = jax.random.split(key)
    model = ScannedStack(k_model, k, n)
    kernels = np.asarray(model.layers.kernel[...])
    biases = np.asarray(model.layers.bias[...])
    rule = convert.QuantizationRule(weight_granularity=weight_granularity, activation_scheme=activation_scheme)
    report = convert.quantize_nnx(model, [rule])
    layers = model.layers
    assert isinstance(layers, fp8_nnx.Fp8Dense) and (layers.in_features, layers.out_features) == (k, n)
    assert layers.weight[...].shape == (3, n, k)
    assert report.layers == ()  # stacked layers are converted but not observed
    x = jax.random.normal(k_x, (5, k), jnp.float32)
    out = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert out.shape == (3, 5, n)
    x_codes, x_scale = reference_activation(np.asarray(x), activation_scheme)
    for i in range(3):
        # Each slice is quantized as a layer of its own: its own codes and scales, from NumPy.
        w = kernels[i].T
        w_codes, w_scale = (
            reference.quant_dynamic_per_tensor(w)
            if weight_granularity == "per_tensor"
            else reference.quant_dynamic_per_token(w)
        )
        np.testing.assert_array_equal(np.asarray(layers.weight[...][i]).view(np.uint8), w_codes.view(np.uint8))
        np.testing.assert_array_equal(np.asarray(layers.weight_scale[...][i]), w_scale)
        np.testing.assert_array_equal(np.asarray(layers.bias[...][i]), biases[i])
        # Same codes on both sides: only float32 accumulation and output rounding differ.
        ref = reference.scaled_mm(x_codes, w_codes, x_scale, w_scale, biases[i])
        reference.assert_gemm_close(out[i], ref, k, jnp.float32)


def test_nnx_scan_stack_static_is_refused(key):
    model = ScannedStack(key, 16, 8)
    with pytest.raises(NotImplementedError, match="stacked"):
        convert.quantize_nnx(
            model, [convert.QuantizationRule(activation_scheme="static")], calibration_data=batches(key, 1, (2, 16))
        )


class WithUnused(nnx.Module):
    def __init__(self, rngs):
        self.used = nnx.Linear(32, 16, rngs=rngs)
        self.unused = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.used(x)


def test_static_layer_not_called_on_calibration_data_is_an_error(key):
    model = WithUnused(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"static layer 'unused' was not called on calibration_data"):
        convert.quantize_nnx(
            model, [convert.QuantizationRule(activation_scheme="static")], calibration_data=batches(key, 2)
        )
    assert isinstance(model.used, nnx.Linear) and isinstance(model.unused, nnx.Linear)  # nothing replaced


def test_dynamic_layer_not_called_is_converted_and_left_out_of_the_report(key):
    model = WithUnused(nnx.Rngs(0))
    report = convert.quantize_nnx(model, [convert.QuantizationRule()], calibration_data=batches(key, 2))
    assert [row.path for row in report.layers] == ["used"]
    assert isinstance(model.unused, fp8_nnx.Fp8Dense)


def test_linen_layer_called_on_some_batches_only(key):
    class Branching(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(32, name="first")(x)
            if x.shape[0] > 4:  # only batches of more than 4 rows reach "second"
                x = nn.Dense(32, name="second")(x)
            return x

    model = Branching()
    data = [batches(k, 1, shape)[0] for k, shape in zip(jax.random.split(key), [(6, 32), (3, 32)])]
    variables = model.init(jax.random.key(0), data[0])
    rule = convert.QuantizationRule(activation_scheme="static", weight_granularity="per_tensor")
    _, fp8_variables, report = convert.quantize_linen(model, variables, [rule], data)
    p = variables["params"]["first"]
    hidden = np.asarray(data[0], np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    # "second" saw one batch: its amax is that batch's (float32 layer vs float64: K=32 rounding).
    np.testing.assert_allclose(report["second"].input_amax, np.abs(hidden).max(), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(fp8_variables["params"]["second"]["input_scale"]), [report["second"].input_amax / 448], rtol=1e-6
    )


def test_linen_dense_called_with_keyword_inputs(key):
    class Keyword(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(24, bias_init=nn.initializers.normal(1.0), name="proj")(inputs=x)

    model = Keyword()
    x = batches(key, 1, (5, 32))[0]
    variables = model.init(jax.random.key(1), x)
    fp8_model, fp8_variables, report = convert.quantize_linen(model, variables, [convert.QuantizationRule()], [x])
    assert [row.path for row in report.layers] == ["proj"]
    p = variables["params"]["proj"]
    w_codes, w_scale = reference.quant_dynamic_per_token(np.asarray(p["kernel"]).T)
    x_codes, x_scale = reference.quant_dynamic_per_token(np.asarray(x))
    ref = reference.scaled_mm(x_codes, w_codes, x_scale, w_scale, np.asarray(p["bias"]))
    reference.assert_gemm_close(fp8_model.apply(fp8_variables, x), ref, 32, jnp.float32)


# (input dtype, float layer param_dtype, float layer dtype): the converted layer returns what the
# float layer returned, `dtype` if set, else `result_type(input, param_dtype)`.
DTYPE_CASES = [
    (jnp.bfloat16, jnp.float32, None),
    (jnp.float32, jnp.bfloat16, None),
    (jnp.bfloat16, jnp.bfloat16, None),
    (jnp.float32, jnp.float32, jnp.bfloat16),
]


@pytest.mark.parametrize("input_dtype,param_dtype,dtype", DTYPE_CASES)
def test_nnx_converted_layer_keeps_the_float_output_dtype(key, input_dtype, param_dtype, dtype):
    k_x, k_bias = jax.random.split(key)
    model = nnx.Dict(
        proj=nnx.Linear(
            32, 24, dtype=dtype, param_dtype=param_dtype, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(3)
        )
    )
    x = jax.random.normal(k_x, (5, 32), input_dtype)
    float_dtype = model["proj"](x).dtype
    kernel, bias = np.asarray(model["proj"].kernel[...], np.float32), np.asarray(model["proj"].bias[...])
    convert.quantize_nnx(model, [convert.QuantizationRule()])
    out = model["proj"](x)
    assert out.dtype == float_dtype == (dtype or jnp.result_type(input_dtype, param_dtype))
    w_codes, w_scale = reference.quant_dynamic_per_token(kernel.T)
    x_codes, x_scale = reference.quant_dynamic_per_token(np.asarray(x, np.float32))
    ref = reference.scaled_mm(x_codes, w_codes, x_scale, w_scale, bias)
    reference.assert_gemm_close(out, ref, 32, out.dtype)


@pytest.mark.parametrize("input_dtype,param_dtype,dtype", DTYPE_CASES)
def test_linen_converted_layer_keeps_the_float_output_dtype(key, input_dtype, param_dtype, dtype):
    model = nn.Dense(24, dtype=dtype, param_dtype=param_dtype, bias_init=nn.initializers.normal(1.0))
    x = jax.random.normal(key, (5, 32), input_dtype)
    variables = model.init(jax.random.key(4), x)
    float_dtype = model.apply(variables, x).dtype
    fp8_model, fp8_variables, _ = convert.quantize_linen(model, variables, [convert.QuantizationRule()], [x])
    out = fp8_model.apply(fp8_variables, x)
    assert out.dtype == float_dtype == (dtype or jnp.result_type(input_dtype, param_dtype))
    p = variables["params"]
    w_codes, w_scale = reference.quant_dynamic_per_token(np.asarray(p["kernel"], np.float32).T)
    x_codes, x_scale = reference.quant_dynamic_per_token(np.asarray(x, np.float32))
    ref = reference.scaled_mm(x_codes, w_codes, x_scale, w_scale, np.asarray(p["bias"]))
    reference.assert_gemm_close(out, ref, 32, out.dtype)


def test_fuse_mixed_per_tensor_and_per_channel_shards(key):
    """Per-channel fusion of shards stored with per-tensor and per-channel scales: one scale per row."""
    widths = (16, 8, 12)
    keys = jax.random.split(key, len(widths))
    shards = []
    for i, (k_shard, rows) in enumerate(zip(keys, widths)):
        weight = np.asarray(jax.random.normal(k_shard, (rows, 24), jnp.float32)) * (i + 1)
        shards.append(
            reference.quant_dynamic_per_tensor(weight) if i != 1 else reference.quant_dynamic_per_token(weight)
        )
    weight, weight_scale = weight_utils.fuse_fp8_shards(
        [(jnp.asarray(c), jnp.asarray(s)) for c, s in shards], "per_channel"
    )
    expected_scale = np.concatenate(
        [np.broadcast_to(s.reshape(-1, 1), (rows, 1)) for (_, s), rows in zip(shards, widths)]
    )
    np.testing.assert_array_equal(np.asarray(weight_scale), expected_scale)
    codes = np.concatenate([c for c, _ in shards])
    np.testing.assert_array_equal(np.asarray(weight).view(np.uint8), codes.view(np.uint8))  # codes unchanged
    bad = [shards[0], (shards[1][0], shards[1][1][:5])]
    with pytest.raises(ValueError, match=r"shard 1: weight_scale of shape \(5, 1\)"):
        weight_utils.fuse_fp8_shards([(jnp.asarray(c), jnp.asarray(s)) for c, s in bad], "per_channel")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_data_names_the_layer_and_batch(key, bad):
    data = batches(key, 3)
    data[1] = data[1].at[2, 4].set(bad)
    rules = [convert.QuantizationRule(activation_scheme="static")]
    with pytest.raises(ValueError, match=r"calibration batch 1: the inputs of layer\(s\) \[.*'up'\] hold NaN or Inf"):
        convert.quantize_nnx(Model(nnx.Rngs(0)), rules, calibration_data=data)
    model = LinenModel()
    variables = model.init(jax.random.key(0), data[0])
    with pytest.raises(ValueError, match=r"calibration batch 1: the inputs of layer\(s\) \[.*'up'\] hold NaN or Inf"):
        convert.quantize_linen(model, variables, rules, data)


def test_non_finite_kernels_name_the_layer(key):
    model = Model(nnx.Rngs(0))
    model.layers[1].kernel.set_value(model.layers[1].kernel[...].at[0, 0].set(np.nan))
    with pytest.raises(ValueError, match=r"the kernel of layer 'layers/1' holds 1 NaN or Inf value"):
        convert.quantize_nnx(model, [convert.QuantizationRule()])
    assert isinstance(model.layers[1], nnx.Linear)  # nothing was replaced
    linen_model = LinenModel()
    variables = linen_model.init(jax.random.key(0), batches(key, 1)[0])
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    params["up"]["kernel"] = params["up"]["kernel"].at[1, 1].set(np.inf)
    with pytest.raises(ValueError, match=r"the kernel of layer 'up' holds 1 NaN or Inf value"):
        convert.quantize_linen(linen_model, {"params": params}, [convert.QuantizationRule()], batches(key, 1))
