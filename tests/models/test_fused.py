"""Fused projections of the Llama decoder (`models.fused`): the fused float model against the float64
reference, each fp8 scheme's fused model against the same model unfused, the GEMMs a layer runs,
the fused parameters, and what cannot be fused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tests.models.test_llama import CONFIGS, LENGTH, all_logits, assert_logits_close, random_tensors, token_ids
from w8a8_jax import dense
from w8a8_jax.models import fused, hf_checkpoint, schemes
from w8a8_jax.models.llama import LlamaConfig
from w8a8_jax.nnx import Fp8Dense

CONFIG = CONFIGS[False]
# Shards of whole 128 x 128 blocks (q, k, v: 128 rows each; gate, up: 256), for the block scheme.
BLOCK_CONFIG = dataclasses.replace(
    CONFIG, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=64
)
# The same fp8 codes and scales run through one GEMM instead of three: the outputs differ by the
# float32 GEMMs' summation order only (measured 0 on CPU); a shard's scales or rows in the wrong
# place move the logits by O(1).
FP8_TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def model(config: LlamaConfig, scheme: str | None):
    tensors = random_tensors(config, jax.random.key(3))
    built = hf_checkpoint.llama_from_tensors(config, tensors)
    if scheme is not None:
        calibration = schemes.calibration_batches(token_ids(7, 32), 16) if schemes.scheme(scheme).is_static else ()
        schemes.quantize(built, scheme, calibration)
    return built, tensors


def tokens():
    return jnp.asarray([token_ids(1, LENGTH), token_ids(2, LENGTH)], jnp.int32)


def test_fused_float_model_matches_the_float64_reference():
    built, tensors = model(CONFIG, None)
    fused.fuse_projections(built)
    got = all_logits(built, tokens())
    for row, ids in enumerate(np.asarray(tokens())):
        assert_logits_close(got[row], reference.llama_logits(tensors, CONFIG, ids))


@pytest.mark.parametrize(
    "scheme, config", [("channel-token", CONFIG), ("tensor-static", CONFIG), ("block", BLOCK_CONFIG)]
)
def test_fused_fp8_model_computes_what_it_computed_unfused(scheme, config):
    built, _ = model(config, scheme)
    unfused = np.asarray(all_logits(built, tokens()), np.float64)
    fused.fuse_projections(built)
    assert_logits_close(all_logits(built, tokens()), unfused, FP8_TOLERANCE)


def test_fused_parameters():
    """tensor-static: the shards' codes stacked as they were, each shard's per-tensor scale spread
    over its rows, the shards' (equal) static input scale kept."""
    built, _ = model(CONFIG, "tensor-static")
    attn = built.layers[1].self_attn
    shards = [attn.q_proj.params, attn.k_proj.params, attn.v_proj.params]
    fused.fuse_projections(built)
    layer = built.layers[1].self_attn.qkv_proj
    assert isinstance(layer, Fp8Dense) and layer.scheme.weight_granularity == "per_channel"
    assert layer.scheme.activation_scheme == "static"
    params = layer.params
    codes = np.concatenate([np.asarray(p.weight).view(np.uint8) for p in shards])
    np.testing.assert_array_equal(np.asarray(params.weight).view(np.uint8), codes)
    rows = [np.full((p.weight.shape[0], 1), float(p.weight_scale[0]), np.float32) for p in shards]
    np.testing.assert_array_equal(np.asarray(params.weight_scale), np.concatenate(rows))
    assert float(params.input_scale[0]) == max(float(p.input_scale[0]) for p in shards)
    assert not hasattr(built.layers[1].self_attn, "q_proj") and not hasattr(built.layers[1].mlp, "up_proj")


@pytest.mark.parametrize("scheme", [None, "channel-token"])
def test_a_fused_layer_runs_four_gemms(monkeypatch, scheme):
    """7 projection calls a layer unfused, 4 fused (qkv, o, gate/up, down)."""
    calls = []
    if scheme is None:
        original = nnx.Linear.__call__
        monkeypatch.setattr(nnx.Linear, "__call__", lambda self, x: calls.append(1) or original(self, x))
    else:
        original = dense.fp8_dense
        monkeypatch.setattr(dense, "fp8_dense", lambda *a, **k: calls.append(1) or original(*a, **k))
    built, _ = model(CONFIG, scheme)
    layer = built.layers[0]
    x = jax.random.normal(jax.random.key(0), (1, 3, CONFIG.hidden_size))
    cache = jnp.zeros((1, CONFIG.num_key_value_heads, 4, CONFIG.head_dim))
    args = (x, jnp.arange(3)[None], cache, cache, jnp.zeros(1, jnp.int32))
    layer(*args)
    assert len(calls) == 7
    calls.clear()
    fused.fuse_projections(built)
    layer(*args)
    assert len(calls) == 4


def test_what_cannot_be_fused():
    built, _ = model(CONFIG, "block")  # q 64 rows, k and v 32: not whole 128-row blocks
    with pytest.raises(ValueError, match=r"layers/0/self_attn: fused block fp8 shards must be multiples"):
        fused.fuse_projections(built)
    assert all(hasattr(layer.self_attn, "q_proj") and hasattr(layer.mlp, "up_proj") for layer in built.layers)
    float_model, _ = model(CONFIG, None)
    fused.fuse_projections(float_model)
    with pytest.raises(ValueError, match="layers/0 is fused already"):
        fused.fuse_projections(float_model)
    fp8_model, _ = model(CONFIG, "channel-token")
    mlp = fp8_model.layers[0].mlp
    with pytest.raises(TypeError, match="all-float or all-fp8"):
        fused.fuse_linears([mlp.gate_proj, float_model.layers[0].self_attn.o_proj], name="mixed")
