"""Hand-made vLLM-layout checkpoints onto nnx and linen `Fp8Dense`, fused shards, and every error case."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tests.checkpoint.conftest import CONFIGS, random_float, vllm_layer, write_vllm_checkpoint
from w8a8_jax import checkpoint
from w8a8_jax.nnx import Fp8Dense

K, N, UP = 32, 48, 80


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(K, N, rngs=rngs)
        self.mlp = nnx.Dict(up=nnx.Linear(N, UP, rngs=rngs))

    def __call__(self, x):
        return self.mlp["up"](self.proj(x))


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(UP, name="up")(nn.Dense(N, name="proj")(x))


def quantize_input(x, scheme, input_scale):
    """Reference activation quantization: (codes, scale_a)."""
    if scheme == "static":
        return reference.quant_static(x, input_scale), np.asarray(input_scale, np.float32).reshape(1)
    if scheme == "dynamic_per_tensor":
        return reference.quant_dynamic_per_tensor(x)
    return reference.quant_dynamic_per_token(x)


def reference_layer(x, tensors, prefix, scheme):
    codes, scale_a = quantize_input(x, scheme, tensors.get(f"{prefix}.input_scale"))
    return reference.scaled_mm(
        codes, tensors[f"{prefix}.weight"], scale_a, tensors[f"{prefix}.weight_scale"], tensors.get(f"{prefix}.bias")
    )


def tiny_checkpoint(tmp_path, rng, granularity, scheme):
    static = scheme == "static"
    tensors = {
        **vllm_layer(rng, "proj", N, K, granularity, static),
        **vllm_layer(rng, "mlp.up", UP, N, granularity, static),
    }
    if granularity == "per_channel":  # compressed-tensors stores (1,) shaped activation scales
        tensors = {name: v.reshape(1) if name.endswith("input_scale") else v for name, v in tensors.items()}
    tensors["lm_head.weight"] = random_float(rng, (7, UP)).astype(ml_dtypes.bfloat16)  # ignored layer, stays float
    return write_vllm_checkpoint(tmp_path / "ckpt", tensors, CONFIGS[granularity, scheme]), tensors


@pytest.mark.parametrize("granularity,scheme", list(CONFIGS))
def test_hand_made_checkpoint_onto_nnx(tmp_path, rng, granularity, scheme):
    path, tensors = tiny_checkpoint(tmp_path, rng, granularity, scheme)
    model = Tiny(nnx.Rngs(0))
    assert sorted(checkpoint.load_nnx(model, path)) == ["mlp/up", "proj"]
    assert isinstance(model.proj, Fp8Dense) and model.proj.scheme.activation_scheme == scheme
    np.testing.assert_array_equal(
        np.asarray(model.proj.weight[...]).view(np.uint8), tensors["proj.weight"].view(np.uint8)
    )
    x = random_float(rng, (5, K))
    hidden = np.asarray(model.proj(jnp.asarray(x)))
    reference.assert_gemm_close(hidden, reference_layer(x, tensors, "proj", scheme), K, jnp.float32)
    out = np.asarray(model(jnp.asarray(x)))
    reference.assert_gemm_close(out, reference_layer(hidden, tensors, "mlp.up", scheme), N, jnp.float32)


@pytest.mark.parametrize("granularity,scheme", list(CONFIGS))
def test_hand_made_checkpoint_onto_linen(tmp_path, rng, granularity, scheme):
    path, tensors = tiny_checkpoint(tmp_path, rng, granularity, scheme)
    model = TinyLinen()
    x = random_float(rng, (6, K))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"missing tensor 'up.weight'"):
        checkpoint.load_linen(model, variables, path)  # default names are the linen paths: "up", not "mlp.up"
    fp8_model, fp8_variables = checkpoint.load_linen(model, variables, path, {"proj": "proj", "up": "mlp.up"})
    assert sorted(fp8_model.schemes) == ["proj", "up"]
    assert fp8_variables["params"]["up"]["weight"].dtype == jnp.float8_e4m3fn
    assert "kernel" in variables["params"]["up"]  # not modified
    _, intermediates = fp8_model.apply(fp8_variables, jnp.asarray(x), capture_intermediates=True)
    hidden = np.asarray(intermediates["intermediates"]["proj"]["__call__"][0])
    reference.assert_gemm_close(hidden, reference_layer(x, tensors, "proj", scheme), K, jnp.float32)
    out = np.asarray(fp8_model.apply(fp8_variables, jnp.asarray(x)))
    reference.assert_gemm_close(out, reference_layer(hidden, tensors, "mlp.up", scheme), N, jnp.float32)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("static", [False, True])
def test_fused_qkv_from_separate_shards(tmp_path, rng, granularity, static):
    widths = (32, 16, 16)
    tensors = {}
    for name, width in zip("qkv", widths):
        tensors.update(vllm_layer(rng, f"attn.{name}_proj", width, K, granularity, static))
    scheme = "static" if static else ("dynamic_per_tensor" if granularity == "per_tensor" else "dynamic_per_token")
    path = write_vllm_checkpoint(tmp_path / "ckpt", tensors, CONFIGS[granularity, scheme])
    model = nnx.Dict(qkv_proj=nnx.Linear(K, sum(widths), rngs=nnx.Rngs(0)))
    names = {"qkv_proj": [f"attn.{s}_proj" for s in "qkv"]}
    checkpoint.load_nnx(model, path, names)
    layer = model["qkv_proj"]
    # vLLM's fusion, from its formula: per-tensor shards are requantized to the largest shard scale;
    # per-channel scales are concatenated with the codes unchanged.
    shard_scales = [tensors[f"attn.{s}_proj.weight_scale"] for s in "qkv"]
    shard_codes = [tensors[f"attn.{s}_proj.weight"] for s in "qkv"]
    if granularity == "per_tensor":
        max_scale = np.max(np.stack([s.reshape(()) for s in shard_scales]))
        codes = np.concatenate(
            [reference.quant_static(c.astype(np.float32) * s, max_scale) for c, s in zip(shard_codes, shard_scales)]
        )
        weight_scale = np.array([max_scale], np.float32)
    else:
        codes, weight_scale = np.concatenate(shard_codes), np.concatenate(shard_scales)
    np.testing.assert_array_equal(np.asarray(layer.weight[...]).view(np.uint8), codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(layer.weight_scale[...]), weight_scale)
    bias = np.concatenate([tensors[f"attn.{s}_proj.bias"] for s in "qkv"])
    x = random_float(rng, (4, K))
    input_scale = max(float(tensors[f"attn.{s}_proj.input_scale"]) for s in "qkv") if static else None
    q, scale_a = quantize_input(x, scheme, input_scale)
    reference.assert_gemm_close(
        layer(jnp.asarray(x)), reference.scaled_mm(q, codes, scale_a, weight_scale, bias), K, jnp.float32
    )


@pytest.mark.parametrize("granularity,scheme", list(CONFIGS))
def test_nnx_save_load_round_trip(tmp_path, rng, granularity, scheme):
    """Fp8Dense layers (one fused) -> checkpoint -> fresh model: identical tensors and outputs."""
    path, _ = tiny_checkpoint(tmp_path, rng, granularity, scheme)
    model = Tiny(nnx.Rngs(0))
    checkpoint.load_nnx(model, path)
    config = checkpoint.read_quantization_config(checkpoint.SafetensorsCheckpoint(path))
    names = {"proj": ["a", "b"], "mlp/up": "mlp.up"}
    checkpoint.write_checkpoint(
        tmp_path / "saved",
        checkpoint.nnx_fp8_tensors(model, names, shard_widths={"proj": (20, 28)}),
        config={"quantization_config": config.to_dict()},
    )
    fresh = Tiny(nnx.Rngs(1))
    checkpoint.load_nnx(fresh, tmp_path / "saved", names)
    for before, after in ((model.proj, fresh.proj), (model.mlp["up"], fresh.mlp["up"])):
        for name in ("weight", "weight_scale", "input_scale", "bias"):
            if getattr(before, name) is None:
                assert getattr(after, name) is None
                continue
            a, b = np.asarray(getattr(before, name)[...]), np.asarray(getattr(after, name)[...])
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    x = jnp.asarray(random_float(rng, (3, K)))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


# ----------------------------------------------------------------------------------------------
# Errors: each names the tensor, and the model is left as it was.


def corrupt(tensors, name, value):
    tensors = dict(tensors)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    return tensors


ERRORS = [
    ("proj.weight_scale", None, "static", r"missing tensor 'proj.weight_scale'"),
    ("mlp.up.input_scale", None, "static", r"missing tensor 'mlp.up.input_scale'"),
    (
        "proj.weight",
        lambda t: t.astype(np.float32).astype(np.float16),
        "static",
        r"proj.weight must be F8_E4M3, got F16",
    ),
    (
        "proj.weight_scale",
        lambda t: t.astype(np.float64),
        "static",
        r"proj.weight_scale must be F32, BF16 or F16, got F64",
    ),
    ("proj.weight_scale", lambda t: np.full((N, 1), t, np.float32), "static", r"proj.weight_scale has shape \(48, 1\)"),
    (
        "mlp.up.input_scale",
        lambda t: np.full((3,), t, np.float32),
        "static",
        r"mlp.up.input_scale must be a scalar or \(1,\)",
    ),
    ("proj.weight_scale", lambda t: np.array(np.nan, np.float32), "static", r"proj.weight_scale holds NaN or Inf"),
    ("proj.weight_scale", lambda t: np.array(np.inf, np.float32), "static", r"proj.weight_scale holds NaN or Inf"),
    ("mlp.up.input_scale", lambda t: np.array(0.0, np.float32), "static", r"mlp.up.input_scale must be > 0"),
    ("proj.weight_scale", lambda t: np.array(-t, np.float32), "static", r"proj.weight_scale must be > 0"),
    ("proj.bias", lambda t: t[:-1], "static", r"proj.bias must be a float \(48,\)"),
    ("proj.weight", lambda t: t.reshape(-1), "static", r"proj.weight must be \(N, K\)"),
    ("proj.input_scale", lambda t: t, "dynamic_per_tensor", r"proj.input_scale is present"),
    ("mlp.up.bias", None, "static", r"missing tensor 'mlp.up.bias': the module at 'mlp/up' has a bias"),
]


@pytest.mark.parametrize("name,change,scheme,match", ERRORS)
def test_inconsistent_checkpoint_is_a_clear_error_and_loads_nothing(tmp_path, rng, name, change, scheme, match):
    _, tensors = tiny_checkpoint(tmp_path, rng, "per_tensor", "static")
    if name == "proj.input_scale":
        tensors = {n: v for n, v in tensors.items() if not n.startswith("mlp.up.input")}
    else:
        tensors = corrupt(tensors, name, None if change is None else change(tensors[name]))
    config = CONFIGS["per_tensor", scheme]
    write_vllm_checkpoint(tmp_path / "bad", tensors, config)
    model = Tiny(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=match):
        checkpoint.load_nnx(model, tmp_path / "bad")
    assert isinstance(model.proj, nnx.Linear) and isinstance(model.mlp["up"], nnx.Linear)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))


def test_nan_weight_codes(tmp_path, rng):
    _, tensors = tiny_checkpoint(tmp_path, rng, "per_channel", "dynamic_per_token")
    bits = tensors["mlp.up.weight"].view(np.uint8).copy()
    bits[3, 5] = 0x7F  # NaN in e4m3fn
    tensors["mlp.up.weight"] = bits.view(ml_dtypes.float8_e4m3fn)
    write_vllm_checkpoint(tmp_path / "bad", tensors, CONFIGS["per_channel", "dynamic_per_token"])
    with pytest.raises(ValueError, match="mlp.up.weight holds NaN codes"):
        checkpoint.load_nnx(Tiny(nnx.Rngs(0)), tmp_path / "bad")


def test_module_shape_mismatch_and_unknown_paths(tmp_path, rng):
    path, _ = tiny_checkpoint(tmp_path, rng, "per_tensor", "static")
    model = nnx.Dict(proj=nnx.Linear(K, N + 1, rngs=nnx.Rngs(0)))
    with pytest.raises(
        ValueError, match=r"proj: checkpoint \['proj'\] holds \(K, N\) = \(32, 48\), the module has \(32, 49\)"
    ):
        checkpoint.load_nnx(model, path, {"proj": "proj"})
    with pytest.raises(ValueError, match=r"no nnx.Linear or Fp8Dense at module paths \['nope'\]"):
        checkpoint.load_nnx(model, path, {"nope": "proj"})


def test_not_an_fp8_checkpoint(tmp_path, rng):
    write_vllm_checkpoint(tmp_path / "float", {"proj.weight": random_float(rng, (N, K))}, None)
    with pytest.raises(ValueError, match="no quantization_config"):
        checkpoint.load_nnx(Tiny(nnx.Rngs(0)), tmp_path / "float")
    (tmp_path / "float" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ValueError, match="'awq'"):
        checkpoint.load_nnx(Tiny(nnx.Rngs(0)), tmp_path / "float")


def test_bias_the_module_lacks_is_an_error_and_loads_nothing(tmp_path, rng):
    path, _ = tiny_checkpoint(tmp_path, rng, "per_channel", "dynamic_per_token")
    model = nnx.Dict(proj=nnx.Linear(K, N, use_bias=False, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'proj.bias': the module at 'proj' has no bias"):
        checkpoint.load_nnx(model, path, {"proj": "proj"})
    assert isinstance(model["proj"], nnx.Linear)


@pytest.mark.parametrize("module_bias", [True, False])
def test_linen_bias_must_match_the_checkpoint(tmp_path, rng, module_bias):
    _, tensors = tiny_checkpoint(tmp_path, rng, "per_tensor", "static")
    if module_bias:  # the module has a bias the checkpoint lacks
        tensors = corrupt(tensors, "proj.bias", None)
    path = write_vllm_checkpoint(tmp_path / "bad", tensors, CONFIGS["per_tensor", "static"])

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(N, use_bias=module_bias, name="proj")(x)

    x = random_float(rng, (3, K))
    variables = Proj().init(jax.random.key(0), x)
    match = (
        r"missing tensor 'proj.bias': the module at 'proj' has a bias"
        if module_bias
        else r"unexpected tensor 'proj.bias': the module at 'proj' has no bias"
    )
    with pytest.raises(ValueError, match=match):
        checkpoint.load_linen(Proj(), variables, path)


@pytest.mark.parametrize("missing", [("k",), ("q", "k", "v")])
def test_fused_shard_without_bias_is_named(tmp_path, rng, missing):
    """Every shard of a fused layer is checked: one shard without a bias, or all of them."""
    tensors = {}
    for name, width in zip("qkv", (32, 16, 16)):
        tensors.update(vllm_layer(rng, f"attn.{name}_proj", width, K, "per_channel", False))
    for name in missing:
        del tensors[f"attn.{name}_proj.bias"]
    path = write_vllm_checkpoint(tmp_path / "ckpt", tensors, CONFIGS["per_channel", "dynamic_per_token"])
    model = nnx.Dict(qkv_proj=nnx.Linear(K, 64, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=rf"missing tensor 'attn.{missing[0]}_proj.bias'"):
        checkpoint.load_nnx(model, path, {"qkv_proj": [f"attn.{s}_proj" for s in "qkv"]})
    assert isinstance(model["qkv_proj"], nnx.Linear)


@pytest.mark.parametrize("input_dtype", [jnp.bfloat16, jnp.float32])
def test_loaded_layers_keep_the_float_output_dtype(tmp_path, rng, input_dtype):
    """A float32 `nnx.Linear` returns float32 for bf16 inputs (and a bf16 checkpoint bias): so does its fp8 layer."""
    path, tensors = tiny_checkpoint(tmp_path, rng, "per_channel", "dynamic_per_token")
    model = Tiny(nnx.Rngs(0))
    x = jnp.asarray(random_float(rng, (4, K)), input_dtype)
    float_dtype = model.proj(x).dtype
    checkpoint.load_nnx(model, path)
    out = model.proj(x)
    assert out.dtype == float_dtype == jnp.float32
    reference.assert_gemm_close(
        out, reference_layer(np.asarray(x, np.float32), tensors, "proj", "dynamic_per_token"), K, jnp.float32
    )


@pytest.mark.parametrize("scale_dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("granularity,scheme", [("per_channel", "dynamic_per_token"), ("per_tensor", "static")])
def test_bf16_and_f16_scales_read_exactly(tmp_path, rng, scale_dtype, granularity, scheme):
    """llm-compressor stores scales in the model's dtype: they are read and upcast exactly."""
    _, tensors = tiny_checkpoint(tmp_path, rng, granularity, scheme)
    for name in list(tensors):
        if name.endswith(("weight_scale", "input_scale")):
            tensors[name] = tensors[name].astype(scale_dtype)
    path = write_vllm_checkpoint(tmp_path / "low", tensors, CONFIGS[granularity, scheme])
    fp8 = checkpoint.SafetensorsCheckpoint(path)
    assert fp8.dtype_name("proj.weight_scale") == ("BF16" if scale_dtype == ml_dtypes.bfloat16 else "F16")
    for layer in checkpoint.read_fp8_layers(fp8):
        want = tensors[f"{layer.prefix}.weight_scale"].astype(np.float32)
        assert layer.weight_scale.dtype == np.float32
        np.testing.assert_array_equal(layer.weight_scale, want.reshape(layer.weight_scale.shape))
        if scheme == "static":
            np.testing.assert_array_equal(layer.input_scale, tensors[f"{layer.prefix}.input_scale"].astype(np.float32))
    model = Tiny(nnx.Rngs(0))
    checkpoint.load_nnx(model, path)
    x = random_float(rng, (3, K))
    low = {n: (t.astype(np.float32) if n.endswith("scale") else t) for n, t in tensors.items()}
    reference.assert_gemm_close(model.proj(jnp.asarray(x)), reference_layer(x, low, "proj", scheme), K, jnp.float32)


def test_load_refuses_checkpoint_layers_no_module_takes(tmp_path, rng):
    _, tensors = tiny_checkpoint(tmp_path, rng, "per_channel", "dynamic_per_token")
    tensors.update(vllm_layer(rng, "extra", 8, K, "per_channel", False))
    path = write_vllm_checkpoint(tmp_path / "extra", tensors, CONFIGS["per_channel", "dynamic_per_token"])
    model = Tiny(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"1 fp8 layer\(s\) of the checkpoint match no module: \['extra'\]"):
        checkpoint.load_nnx(model, path)
    assert isinstance(model.proj, nnx.Linear)
    assert sorted(checkpoint.load_nnx(model, path, strict=False)) == ["mlp/up", "proj"]
    linen_model = TinyLinen()
    variables = linen_model.init(jax.random.key(0), random_float(rng, (2, K)))
    names = {"proj": "proj", "up": "mlp.up"}
    with pytest.raises(ValueError, match=r"match no module: \['extra'\]"):
        checkpoint.load_linen(linen_model, variables, path, names)
    checkpoint.load_linen(linen_model, variables, path, names, strict=False)
