"""Checkpoints of converted models: nnx state through orbax, linen variables through flax.serialization."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

from examples import llama_block
from w8a8_jax import convert


def small_config():
    return llama_block.BlockConfig(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128)


def test_nnx_state_roundtrip_with_orbax(tmp_path, key):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, fp8_block, _, inputs = llama_block.quantize_block(small_config(), length=8)
    expected = fp8_block(inputs)
    state = nnx.state(fp8_block)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "fp8_block", state)
    checkpointer.wait_until_finished()
    # Restore into a fresh converted block: structure from the abstract state, values from disk.
    _, fresh, _, _ = llama_block.quantize_block(small_config(), seed=7, length=8)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.state(fresh))
    restored = checkpointer.restore(tmp_path / "fp8_block", abstract)
    qkv = restored["attn"]["qkv_proj"]
    assert qkv["weight"].get_value().dtype == jnp.float8_e4m3fn
    assert qkv["weight_scale"].get_value().shape == (1,)
    assert restored["attn"]["o_proj"]["input_scale"].get_value().shape == (1,)
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(np.asarray(fresh(inputs)), np.asarray(expected))


def test_linen_variables_roundtrip_with_msgpack(key):
    model = nn.Dense(24)
    x = jax.random.normal(key, (4, 16), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    rules = [convert.QuantizationRule(activation_scheme="static", weight_granularity="per_tensor")]
    fp8_model, fp8_variables, _ = convert.quantize_linen(model, variables, rules, [x], report=False)
    blob = serialization.to_bytes(fp8_variables)
    restored = serialization.from_bytes(fp8_variables, blob)
    assert restored["params"]["weight"].dtype == jnp.float8_e4m3fn
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)),
        restored,
        fp8_variables,
    )
    np.testing.assert_array_equal(
        np.asarray(fp8_model.apply(restored, x)), np.asarray(fp8_model.apply(fp8_variables, x))
    )


def test_block_linen_variables_roundtrip_with_msgpack(key):
    """Block-scaled linen variables (weight_scale `(ceil(N / bn), ceil(K / bk))`) survive msgpack bit for bit."""
    from w8a8_jax.linen import Fp8Dense

    layer = Fp8Dense(200, weight_granularity="block", block_size=(64, 128))
    x = jax.random.normal(key, (3, 320), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["weight_scale"].shape == (4, 3)
    restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)),
        restored,
        variables,
    )
    np.testing.assert_array_equal(np.asarray(layer.apply(restored, x)), np.asarray(layer.apply(variables, x)))


def test_llama_block_example_quantizes_close_to_float():
    float_block, fp8_block, report, inputs = llama_block.quantize_block(small_config(), length=8)
    assert {row.path for row in report.layers} == {"attn/qkv_proj", "attn/o_proj", "mlp/gate_up_proj", "mlp/down_proj"}
    # Each fp8 layer keeps ~25-30 dB (3 mantissa bits); 20 dB leaves room for bf16 inputs.
    assert all(row.sqnr_db > 20 for row in report.layers), str(report)
    run = nnx.jit(lambda block, x: block(x))
    ref = np.asarray(run(float_block, inputs), np.float64) - np.asarray(inputs, np.float64)
    out = np.asarray(run(fp8_block, inputs), np.float64) - np.asarray(inputs, np.float64)
    # Four quantized layers in sequence plus bf16 activations: the residual update keeps > 15 dB.
    assert 10 * np.log10((ref**2).sum() / ((out - ref) ** 2).sum()) > 15
