"""Block-scaled fp8 checkpoints (DeepSeek-V3 / Qwen3-FP8): both forms written by hand and by us,
read back, loaded onto nnx and linen, and every inconsistency refused by name.

The fp8 form stores `p.weight_scale_inv`, the compressed-tensors form `p.weight_scale`, both
`(ceil(N / bn), ceil(K / bk))` multipliers. References are the float64 NumPy ones of
tests/reference.py on fresh random data; shapes are chosen so that N and K end inside a block.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tests.checkpoint.conftest import (
    FP8_FORM_BLOCK,
    block_layer,
    compressed_tensors_block,
    random_float,
    write_vllm_checkpoint,
)
from w8a8_jax import checkpoint
from w8a8_jax.linear import W8A8BlockFp8LinearOp
from w8a8_jax.nnx import Fp8Dense

BLOCK = (128, 128)
# DeepSeek-V3's kv_a_proj_with_mqa is 576 wide (4.5 blocks); K = 320 is 2.5 blocks.
K, N, OUT = 320, 576, 200
# form -> (the quantization_config, the scale's leaf name)
FORMS = {
    "fp8": (FP8_FORM_BLOCK, "weight_scale_inv"),
    "compressed-tensors": (compressed_tensors_block(BLOCK), "weight_scale"),
}
forms = pytest.mark.parametrize("form", list(FORMS))


class DeepSeekTiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.kv_a_proj = nnx.Linear(K, N, rngs=rngs)
        self.o_proj = nnx.Linear(N, OUT, rngs=rngs)

    def __call__(self, x):
        return self.o_proj(self.kv_a_proj(x))


class DeepSeekTinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="o_proj")(nn.Dense(N, name="kv_a_proj")(x))


def tiny_checkpoint(tmp_path, rng, form: str, name="ckpt"):
    config, scale_name = FORMS[form]
    tensors = {
        **block_layer(rng, "kv_a_proj", N, K, BLOCK, scale_name),
        **block_layer(rng, "o_proj", OUT, N, BLOCK, scale_name),
        "lm_head.weight": random_float(rng, (7, OUT)).astype(ml_dtypes.bfloat16),  # ignored, stays float
    }
    return write_vllm_checkpoint(tmp_path / name, tensors, config), tensors


def reference_layer(x, tensors, prefix: str, scale_name: str) -> np.ndarray:
    """float64 output of one block layer on `x (M, K)`: activations per token group of bk (float32
    formula), then the dequantized product, plus the bias."""
    codes, scale_a = reference.quant_per_token_group(x, BLOCK[1])
    weight, scale_b = tensors[f"{prefix}.weight"], tensors[f"{prefix}.{scale_name}"].astype(np.float32)
    return reference.block_scaled_mm(codes, weight, scale_a, scale_b, BLOCK, tensors.get(f"{prefix}.bias"))


# ----------------------------------------------------------------------------------------------
# Writing (quantize from float) and reading back


@forms
def test_quantize_round_trip(tmp_path, rng, form):
    """A float checkpoint quantized to block fp8 in `form` reads back with the reference's codes and
    scales bit for bit; the dequantized weights are within fp8 rounding of the float ones."""
    weights = {"kv_a_proj": random_float(rng, (N, K)), "o_proj": random_float(rng, (OUT, N)) * 30}
    source = write_vllm_checkpoint(tmp_path / "float", {f"{p}.weight": w for p, w in weights.items()}, None)
    config = checkpoint.QuantizationConfig("block", ignore=("lm_head",), form=form, block_size=BLOCK)
    with checkpoint.CheckpointWriter(tmp_path / "fp8", config={"quantization_config": config.to_dict()}) as writer:
        rows = checkpoint.quantize_checkpoint(checkpoint.SafetensorsCheckpoint(source), writer, config, list(weights))
    assert [row["layer"] for row in rows] == ["kv_a_proj", "o_proj"]
    fp8 = checkpoint.SafetensorsCheckpoint(tmp_path / "fp8")
    scale_name = FORMS[form][1]
    assert sorted(fp8.names) == sorted(f"{p}.{leaf}" for p in weights for leaf in ("weight", scale_name))
    assert checkpoint.read_quantization_config(fp8) == config
    for prefix, weight in weights.items():
        assert fp8.dtype_name(f"{prefix}.{scale_name}") == "F32"
        layer = checkpoint.read_fp8_layer(fp8, prefix, config)
        codes, scale = reference.quant_block_weight(weight, BLOCK)
        assert layer.block_size == BLOCK and layer.weight_scale.shape == (
            -(-weight.shape[0] // 128),
            -(-weight.shape[1] // 128),
        )
        reference.assert_bit_identical(layer.weight, codes)
        reference.assert_bit_identical(layer.weight_scale, scale)
        exact = reference.dequantize_blocks(codes, scale, BLOCK)
        # One float32 product per element: within half a float32 ulp of the float64 one.
        np.testing.assert_allclose(layer.dequantized(), exact, rtol=2.0**-24, atol=0)
        # e4m3 keeps 3 mantissa bits: each element within 2^-4 of itself (plus the subnormal step
        # of its block), which a scale of the wrong block or a transposed grid would break.
        step = reference.dequantize_blocks(np.ones_like(codes, np.float32), scale, BLOCK) * 2.0**-9
        assert np.all(np.abs(layer.dequantized() - weight) <= np.abs(weight) * 2.0**-4 + step)


@forms
def test_hand_made_checkpoint_reads_exactly(tmp_path, rng, form):
    path, tensors = tiny_checkpoint(tmp_path, rng, form)
    fp8 = checkpoint.SafetensorsCheckpoint(path)
    config = checkpoint.read_quantization_config(fp8)
    assert (config.form, config.weight_granularity, config.activation_scheme, config.block_size) == (
        form,
        "block",
        "dynamic_per_token_group",
        BLOCK,
    )
    assert config.ignore == ("lm_head",) and config.weight_scale_name == FORMS[form][1]
    layers = {layer.prefix: layer for layer in checkpoint.read_fp8_layers(fp8)}
    assert sorted(layers) == ["kv_a_proj", "o_proj"]
    for prefix, layer in layers.items():
        reference.assert_bit_identical(layer.weight, tensors[f"{prefix}.weight"])
        reference.assert_bit_identical(layer.weight_scale, tensors[f"{prefix}.{FORMS[form][1]}"])


@pytest.mark.parametrize("scale_dtype", [ml_dtypes.bfloat16, np.float16])
@forms
def test_bf16_and_f16_block_scales_upcast_exactly(tmp_path, rng, form, scale_dtype):
    """Block scales stored in the model's dtype read as exactly their float32 values, and the layer
    computes with them."""
    _, tensors = tiny_checkpoint(tmp_path, rng, form)
    scale_name = FORMS[form][1]
    low = {name: t.astype(scale_dtype) if name.endswith(scale_name) else t for name, t in tensors.items()}
    path = write_vllm_checkpoint(tmp_path / "low", low, FORMS[form][0])
    fp8 = checkpoint.SafetensorsCheckpoint(path)
    assert fp8.dtype_name(f"o_proj.{scale_name}") == ("BF16" if scale_dtype == ml_dtypes.bfloat16 else "F16")
    for layer in checkpoint.read_fp8_layers(fp8):
        want = low[f"{layer.prefix}.{scale_name}"].astype(np.float32)
        assert not np.array_equal(want, tensors[f"{layer.prefix}.{scale_name}"])  # the rounding did change them
        reference.assert_bit_identical(layer.weight_scale, want)
    model = DeepSeekTiny(nnx.Rngs(0))
    checkpoint.load_nnx(model, path)
    x = random_float(rng, (3, K))
    reference.assert_gemm_close(
        model.kv_a_proj(jnp.asarray(x)), reference_layer(x, low, "kv_a_proj", scale_name), K, jnp.float32
    )


# ----------------------------------------------------------------------------------------------
# Onto Flax: nnx and linen, the op, fused shards


@forms
def test_deepseek_style_checkpoint_onto_nnx(tmp_path, rng, form):
    path, tensors = tiny_checkpoint(tmp_path, rng, form)
    scale_name = FORMS[form][1]
    model = DeepSeekTiny(nnx.Rngs(0))
    assert sorted(checkpoint.load_nnx(model, path)) == ["kv_a_proj", "o_proj"]
    layer = model.kv_a_proj
    assert isinstance(layer, Fp8Dense) and layer.scheme.is_block and layer.scheme.block_size == BLOCK
    assert layer.weight_scale[...].shape == (5, 3)
    x = random_float(rng, (9, K)) * 4
    hidden = np.asarray(layer(jnp.asarray(x)))
    reference.assert_gemm_close(hidden, reference_layer(x, tensors, "kv_a_proj", scale_name), K, jnp.float32)
    out = np.asarray(model(jnp.asarray(x)))
    reference.assert_gemm_close(out, reference_layer(hidden, tensors, "o_proj", scale_name), N, jnp.float32)


@forms
def test_read_layer_runs_in_the_block_op(tmp_path, rng, form):
    """The tensors as read go straight into `W8A8BlockFp8LinearOp` (bf16 inputs, leading axes)."""
    path, tensors = tiny_checkpoint(tmp_path, rng, form)
    fp8 = checkpoint.SafetensorsCheckpoint(path)
    layer = checkpoint.read_fp8_layer(fp8, "kv_a_proj", checkpoint.read_quantization_config(fp8))
    x = jnp.asarray(random_float(rng, (2, 3, K)), jnp.bfloat16)
    out = W8A8BlockFp8LinearOp(BLOCK, (1, BLOCK[1])).apply(
        x,
        jnp.asarray(layer.weight),
        jnp.asarray(layer.weight_scale),
        bias=jnp.asarray(layer.bias),
        out_dtype=jnp.float32,
    )
    assert out.shape == (2, 3, N)
    ref = reference_layer(np.asarray(x, np.float32).reshape(6, K), tensors, "kv_a_proj", FORMS[form][1])
    reference.assert_gemm_close(np.asarray(out).reshape(6, N), ref, K, jnp.float32)


@forms
def test_deepseek_style_checkpoint_onto_linen(tmp_path, rng, form):
    path, tensors = tiny_checkpoint(tmp_path, rng, form)
    scale_name = FORMS[form][1]
    model = DeepSeekTinyLinen()
    x = random_float(rng, (5, K))
    variables = model.init(jax.random.key(0), x)
    fp8_model, fp8_variables = checkpoint.load_linen(model, variables, path)
    assert fp8_variables["params"]["kv_a_proj"]["weight_scale"].shape == (5, 3)
    assert fp8_model.schemes["kv_a_proj"].block_size == BLOCK
    _, intermediates = fp8_model.apply(fp8_variables, jnp.asarray(x), capture_intermediates=True)
    hidden = np.asarray(intermediates["intermediates"]["kv_a_proj"]["__call__"][0])
    reference.assert_gemm_close(hidden, reference_layer(x, tensors, "kv_a_proj", scale_name), K, jnp.float32)
    out = np.asarray(fp8_model.apply(fp8_variables, jnp.asarray(x)))
    reference.assert_gemm_close(out, reference_layer(hidden, tensors, "o_proj", scale_name), N, jnp.float32)


@forms
def test_fused_qkv_block_shards(tmp_path, rng, form):
    """Separately stored q/k/v shards of whole blocks fuse into one layer, codes and scales concatenated
    (vLLM's block fusion), the last shard ending inside a block."""
    config, scale_name = FORMS[form]
    widths = (256, 128, 72)
    tensors = {}
    for name, width in zip("qkv", widths):
        tensors.update(block_layer(rng, f"attn.{name}_proj", width, K, BLOCK, scale_name))
    path = write_vllm_checkpoint(tmp_path / "ckpt", tensors, config)
    model = nnx.Dict(qkv=nnx.Linear(K, sum(widths), rngs=nnx.Rngs(0)))
    checkpoint.load_nnx(model, path, {"qkv": [f"attn.{s}_proj" for s in "qkv"]})
    layer = model["qkv"]
    fused = {
        leaf: np.concatenate([tensors[f"attn.{s}_proj.{name}"] for s in "qkv"])
        for leaf, name in (("weight", "weight"), ("scale", scale_name), ("bias", "bias"))
    }
    reference.assert_bit_identical(layer.weight[...], fused["weight"])
    reference.assert_bit_identical(layer.weight_scale[...], fused["scale"])
    assert layer.weight_scale[...].shape == (4, 3)
    x = random_float(rng, (4, K))
    codes, scale_a = reference.quant_per_token_group(x, BLOCK[1])
    ref = reference.block_scaled_mm(codes, fused["weight"], scale_a, fused["scale"], BLOCK, fused["bias"])
    reference.assert_gemm_close(layer(jnp.asarray(x)), ref, K, jnp.float32)


def test_fused_shard_ending_inside_a_block_is_refused(tmp_path, rng):
    tensors = {}
    for name, width in zip("qkv", (192, 128, 128)):  # q ends inside its second block
        tensors.update(block_layer(rng, f"attn.{name}_proj", width, K, BLOCK, "weight_scale_inv"))
    path = write_vllm_checkpoint(tmp_path / "ckpt", tensors, FP8_FORM_BLOCK)
    model = nnx.Dict(qkv=nnx.Linear(K, 448, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"fused shards \['attn.q_proj', 'attn.k_proj', 'attn.v_proj'\]: .*bn=128"):
        checkpoint.load_nnx(model, path, {"qkv": [f"attn.{s}_proj" for s in "qkv"]})
    assert isinstance(model["qkv"], nnx.Linear)


@forms
def test_nnx_save_load_round_trip(tmp_path, rng, form):
    """Block `Fp8Dense` layers (one fused, split at a block boundary) -> checkpoint in `form` -> a
    fresh model: identical tensors and outputs; the scale is stored under the form's name."""
    path, _ = tiny_checkpoint(tmp_path, rng, form)
    model = DeepSeekTiny(nnx.Rngs(0))
    checkpoint.load_nnx(model, path)
    config = checkpoint.read_quantization_config(checkpoint.SafetensorsCheckpoint(path))
    names = {"kv_a_proj": ["a", "b"], "o_proj": "o_proj"}
    tensors = dict(checkpoint.nnx_fp8_tensors(model, names, {"kv_a_proj": (256, 320)}, config=config))
    assert tensors[f"a.{FORMS[form][1]}"].shape == (2, 3) and tensors[f"b.{FORMS[form][1]}"].shape == (3, 3)
    checkpoint.write_checkpoint(tmp_path / "saved", tensors, config={"quantization_config": config.to_dict()})
    fresh = DeepSeekTiny(nnx.Rngs(1))
    checkpoint.load_nnx(fresh, tmp_path / "saved", names)
    for before, after in ((model.kv_a_proj, fresh.kv_a_proj), (model.o_proj, fresh.o_proj)):
        for name in ("weight", "weight_scale", "bias"):
            reference.assert_bit_identical(getattr(after, name)[...], getattr(before, name)[...])
    x = jnp.asarray(random_float(rng, (3, K)))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
    with pytest.raises(ValueError, match=r"fused block layer \['a', 'b'\]: shard widths \[200, 376\]"):
        list(checkpoint.nnx_fp8_tensors(model, names, {"kv_a_proj": (200, 376)}, config=config))
    other = checkpoint.QuantizationConfig("block", form=form, block_size=(64, 128))
    with pytest.raises(
        ValueError, match=r"the layer at 'kv_a_proj' is quantized as .*\(128, 128\)\), but .*\(64, 128\)"
    ):
        list(checkpoint.nnx_fp8_tensors(model, names, {"kv_a_proj": (256, 320)}, config=other))


@forms
def test_linen_save_load_round_trip(tmp_path, rng, form):
    """Block linen params -> checkpoint in `form` (the config gives the block and the scale's name)
    -> `load_linen` of a fresh float model: identical tensors and outputs."""
    path, _ = tiny_checkpoint(tmp_path, rng, form)
    model, x = DeepSeekTinyLinen(), random_float(rng, (4, K))
    fp8_model, fp8_variables = checkpoint.load_linen(model, model.init(jax.random.key(0), x), path)
    config = checkpoint.read_quantization_config(checkpoint.SafetensorsCheckpoint(path))
    tensors = dict(checkpoint.linen_fp8_tensors(fp8_variables["params"], config=config))
    assert sorted(tensors) == sorted(
        f"{p}.{leaf}" for p in ("kv_a_proj", "o_proj") for leaf in ("weight", FORMS[form][1], "bias")
    )
    checkpoint.write_checkpoint(tmp_path / "saved", tensors, config={"quantization_config": config.to_dict()})
    fresh_model, fresh = checkpoint.load_linen(model, model.init(jax.random.key(1), x), tmp_path / "saved")
    jax.tree.map(reference.assert_bit_identical, fresh["params"], fp8_variables["params"])
    np.testing.assert_array_equal(
        np.asarray(fresh_model.apply(fresh, jnp.asarray(x))), np.asarray(fp8_model.apply(fp8_variables, jnp.asarray(x)))
    )


# ----------------------------------------------------------------------------------------------
# Errors: each names the tensor (and the expected shape or name); nothing is loaded.


def _refused(tmp_path, tensors, config, match, load_match=None):
    """Reading every layer raises `match`; loading onto a model raises `load_match` (default the same)
    and leaves the model float."""
    path = write_vllm_checkpoint(tmp_path / "bad", tensors, config)
    with pytest.raises(ValueError, match=match):
        list(checkpoint.read_fp8_layers(checkpoint.SafetensorsCheckpoint(path)))
    model = DeepSeekTiny(nnx.Rngs(0))
    with pytest.raises(ValueError, match=load_match or match):
        checkpoint.load_nnx(model, path)
    assert isinstance(model.kv_a_proj, nnx.Linear) and isinstance(model.o_proj, nnx.Linear)


@pytest.mark.parametrize(
    "shape",
    [(4, 3), (5, 2), (3, 5), (5, 3, 1), (576 // 128, 320 // 128)],
    ids=["floor-rows", "floor-cols", "transposed", "3-d", "floor-both"],
)
@forms
def test_block_scale_shape_follows_the_ceil_rule(tmp_path, rng, form, shape):
    _, tensors = tiny_checkpoint(tmp_path, rng, form)
    scale_name = f"kv_a_proj.{FORMS[form][1]}"
    tensors[scale_name] = rng.uniform(0.001, 0.01, shape).astype(np.float32)
    match = (
        rf"{scale_name} has shape {re.escape(str(shape))}; 128x128-block weights of kv_a_proj.weight "
        r"\(576, 320\) need \(5, 3\) \(ceil\(N / 128\), ceil\(K / 128\)\)"
    )
    _refused(tmp_path, tensors, FORMS[form][0], match)


def _renamed(tensors, old, new):
    tensors = dict(tensors)
    tensors[new] = tensors.pop(old)
    return tensors


MISNAMED = [
    # (form of the config, change to the tensors, expected error)
    ("fp8", lambda t: _renamed(t, "o_proj.weight_scale_inv", "o_proj.weight_scale"),
     r"o_proj.weight_scale is present but the 'fp8' form of block weights stores the weight scale as "
     r"o_proj.weight_scale_inv \(which is missing\)"),
    ("compressed-tensors", lambda t: _renamed(t, "o_proj.weight_scale", "o_proj.weight_scale_inv"),
     r"o_proj.weight_scale_inv is present but the 'compressed-tensors' form of block weights stores the "
     r"weight scale as o_proj.weight_scale \(which is missing\)"),
    ("fp8", lambda t: {**t, "o_proj.weight_scale": t["o_proj.weight_scale_inv"]},
     r"o_proj.weight_scale is present but the 'fp8' form of block weights stores the weight scale as "
     r"o_proj.weight_scale_inv$"),
    ("fp8", lambda t: {**t, "o_proj.input_scale": np.array([0.01], np.float32)},
     r"o_proj.input_scale is present but the checkpoint's activation scheme is 'dynamic_per_token_group'"),
    ("fp8", lambda t: {**t, "o_proj.activation_scale": np.array(0.01, np.float32)},
     r"o_proj.activation_scale is present but the 'fp8' form of block weights with dynamic_per_token_group "
     r"activations reads no activation_scale"),
    # Orphans: a scale without an fp8 weight (loading says first that no module takes the layer).
    ("fp8", lambda t: {**t, "gate.weight_scale_inv": np.ones((1, 3), np.float32)},
     r"missing tensor 'gate.weight' \(layer 'gate'\)"),
    ("compressed-tensors", lambda t: {**t, "gate.weight_scale": np.ones((1, 3), np.float32)},
     r"missing tensor 'gate.weight' \(layer 'gate'\)"),
    ("fp8", lambda t: {**t, "lm_head.weight_scale_inv": np.ones((1, 1), np.float32)},
     r"lm_head.weight must be F8_E4M3, got BF16"),
]  # fmt: skip


@pytest.mark.parametrize("form,change,match", MISNAMED)
def test_unused_or_misnamed_scales_are_errors(tmp_path, rng, form, change, match):
    """A scale the checkpoint's form does not read is never dropped: it is an error naming it."""
    _, tensors = tiny_checkpoint(tmp_path, rng, form)
    orphan = "missing tensor" in match or "lm_head" in match
    load_match = r"1 fp8 layer\(s\) of the checkpoint match no module" if orphan else None
    _refused(tmp_path, change(tensors), FORMS[form][0], match, load_match)


def test_block_scales_in_a_per_tensor_fp8_form_checkpoint_are_refused(tmp_path, rng):
    """DeepSeek-style tensors under a config that lost its weight_block_size: the block scale is named,
    with what the config lacks."""
    _, tensors = tiny_checkpoint(tmp_path, rng, "fp8")
    config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    match = (
        r"kv_a_proj.weight_scale_inv is present but the 'fp8' form of per_tensor weights stores the weight scale "
        r"as kv_a_proj.weight_scale \(which is missing\); block scales need weight_block_size"
    )
    _refused(tmp_path, tensors, config, match)


def test_block_size_of_the_config_is_the_one_checked(tmp_path, rng):
    """64x128 blocks written, 128x128 declared: the scale's shape gives it away."""
    tensors = {**block_layer(rng, "kv_a_proj", N, K, (64, 128), "weight_scale_inv")}
    tensors.update(block_layer(rng, "o_proj", OUT, N, (64, 128), "weight_scale_inv"))
    _refused(tmp_path, tensors, FP8_FORM_BLOCK, r"kv_a_proj.weight_scale_inv has shape \(9, 3\);.*need \(5, 3\)")
