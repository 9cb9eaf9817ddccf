"""Block-scaled fp8 in the Flax layers: `Fp8Dense` (nnx and linen), the converter, fused shards and
tensor parallelism, against the float64 references of `tests/reference.py`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests import reference
from w8a8_jax import Fp8Params, Fp8Scheme, convert, sharding, weight_utils
from w8a8_jax import linen as fp8_linen
from w8a8_jax import nnx as fp8_nnx

FP8 = ml_dtypes.float8_e4m3fn
BLOCK = (128, 128)


def float_layer(key, k, n):
    k_w, k_b, k_x = jax.random.split(key, 3)
    kernel = jax.random.normal(k_w, (k, n), jnp.float32) / np.sqrt(k)
    kernel = kernel * (1.0 + (jnp.arange(n)[None, :] // 128))  # row blocks of different scale
    return kernel, jax.random.normal(k_b, (n,)), jax.random.normal(k_x, (3, 5, k), jnp.float32) * 2


def expected(x, kernel, bias, block=BLOCK):
    """float64 of a block layer quantized from `kernel (K, N)`: reference block weights and group
    quantization of `x (..., K)`, the block GEMM, bias."""
    codes, scales = reference.quant_block_weight(np.asarray(kernel).T, block)
    q, scale_a = reference.quant_per_token_group(np.asarray(x).reshape(-1, x.shape[-1]), block[1])
    out = reference.block_scaled_mm(q, codes, scale_a, scales, block, bias)
    return out.reshape(*x.shape[:-1], -1), codes, scales


@pytest.mark.parametrize("k, n", [(576, 640), (256, 576)])
def test_nnx_from_dense_block_matches_float64(key, k, n):
    kernel, bias, x = float_layer(key, k, n)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, weight_granularity="block", fp8_dtype=FP8)
    want, codes, scales = expected(x, kernel, bias)
    reference.assert_bit_identical(layer.weight[...], codes)
    reference.assert_bit_identical(layer.weight_scale[...], scales)
    assert layer.scheme == Fp8Scheme("block", fp8_dtype=FP8)
    reference.assert_gemm_close(layer(x).reshape(-1, n), want.reshape(-1, n), k, jnp.float32)
    jitted = nnx.jit(lambda layer, x: layer(x))(layer, x)
    reference.assert_gemm_close(jitted.reshape(-1, n), want.reshape(-1, n), k, jnp.float32)


def test_nnx_block_size_keyword_and_random_init(key):
    layer = fp8_nnx.Fp8Dense(384, 200, weight_granularity="block", block_size=(64, 128), rngs=nnx.Rngs(0))
    assert layer.weight_scale[...].shape == (4, 3) and layer.scheme.block_size == (64, 128)
    x = jax.random.normal(key, (4, 384), jnp.bfloat16)
    assert layer(x).shape == (4, 200) and layer(x).dtype == jnp.bfloat16


def test_linen_block_matches_float64_and_from_dense(key):
    kernel, bias, x = float_layer(key, 576, 640)
    module, variables = fp8_linen.Fp8Dense.from_dense(kernel, bias, weight_granularity="block", fp8_dtype=FP8)
    want, codes, scales = expected(x, kernel, bias)
    reference.assert_bit_identical(variables["params"]["weight_scale"], scales)
    out = module.apply(variables, x)
    reference.assert_gemm_close(out.reshape(-1, 640), want.reshape(-1, 640), 576, jnp.float32)
    fresh = fp8_linen.Fp8Dense(640, weight_granularity="block")
    params = fresh.init(jax.random.key(0), x)["params"]
    assert params["weight_scale"].shape == (5, 5) and fresh.activation_scheme == "dynamic_per_token_group"


def test_from_fp8_checks_the_block_scale_shape(key):
    kernel, bias, _ = float_layer(key, 576, 640)
    params = Fp8Params.from_float(kernel, bias, scheme=Fp8Scheme("block", fp8_dtype=FP8))
    with pytest.raises(ValueError, match=r"weight_scale of 128x128-block weights \(640, 576\) must be \(5, 5\)"):
        fp8_nnx.Fp8Dense.from_fp8(
            {**params.to_dict(), "weight_scale": params.weight_scale[:, :4]}, scheme=Fp8Scheme("block")
        )


def test_converter_quantizes_to_blocks_and_reports(key):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(256, 384, rngs=rngs)
            self.down = nnx.Linear(384, 256, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = Model(nnx.Rngs(0))
    up_kernel, up_bias = model.up.kernel[...], model.up.bias[...]
    data = [jax.random.normal(k, (6, 256)) for k in jax.random.split(key, 2)]
    report = convert.quantize_nnx(model, [convert.QuantizationRule("up|down", weights="block")], calibration_data=data)
    assert model.up.scheme.is_block and model.up.weight_scale[...].shape == (3, 2)
    _, _, scales = expected(data[0][None], up_kernel, up_bias)
    reference.assert_bit_identical(model.up.weight_scale[...], scales)
    row = report["up"]
    assert row.weight_granularity == "block" and row.activation_scheme == "dynamic_per_token_group"
    assert row.sqnr_db > 25  # fp8 with 128x128 blocks keeps ~30 dB on Gaussian data; a wrong scale gives < 0
    rule = convert.QuantizationRule(weights="block", block_size=(64, 64))
    assert (rule.weight_granularity, rule.scheme.block_size, rule.weights) == ("block", (64, 64), "block")
    with pytest.raises(ValueError, match="weights must be one of"):
        convert.QuantizationRule(weights="blocks")


def test_linen_converter_block(key):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(256, name="proj")(x)

    model = Model()
    x = jax.random.normal(key, (4, 384))
    variables = model.init(jax.random.key(1), x)
    kernel, bias = variables["params"]["proj"]["kernel"], variables["params"]["proj"]["bias"]
    fp8_model, fp8_variables, report = convert.quantize_linen(
        model, variables, [convert.QuantizationRule(weights="block")], [x]
    )
    out = fp8_model.apply(fp8_variables, x)
    want, _, _ = expected(x, kernel, bias)
    reference.assert_gemm_close(out, want, 384, jnp.float32)
    assert report["proj"].weight_granularity == "block" and report["proj"].sqnr_db > 25


def test_fused_shards_of_whole_blocks_concatenate_and_others_are_refused(key):
    shards = []
    for index, rows in enumerate((256, 128, 200)):
        w = jax.random.normal(jax.random.fold_in(key, index), (rows, 320)) * (index + 1)
        shards.append(tuple(jnp.asarray(a) for a in reference.quant_block_weight(w, BLOCK)))
    weight, scale = weight_utils.fuse_block_fp8_shards(shards, BLOCK)
    assert weight.shape == (584, 320) and scale.shape == (5, 3)
    np.testing.assert_array_equal(
        reference.dequantize_blocks(weight, scale, BLOCK),
        np.concatenate([reference.dequantize_blocks(w, s, BLOCK) for w, s in shards]),
    )
    with pytest.raises(
        ValueError, match=r"multiples of the weight block's bn=128 \(but the last\), got widths \[64, 128\]"
    ):
        weight_utils.fuse_block_fp8_shards([(shards[1][0][:64], shards[1][1][:1]), shards[1]], BLOCK)
    with pytest.raises(ValueError, match=r"shard 1 weight_scale must be \(1, 3\)"):
        weight_utils.fuse_block_fp8_shards([shards[0], (shards[1][0], shards[0][1])], BLOCK)


def test_from_float_fused_block_kernel_quantizes_the_fused_weight(key):
    """Shard widths that split a block (64) still give one exact scale per block of the fused weight."""
    kernel, bias, x = float_layer(key, 256, 192)
    params = Fp8Params.from_float(kernel, bias, scheme=Fp8Scheme("block", fp8_dtype=FP8), shard_widths=(64, 64, 64))
    _, codes, scales = expected(x, kernel, bias)
    reference.assert_bit_identical(params.weight, codes)
    reference.assert_bit_identical(params.weight_scale, scales)


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) != 8:
        pytest.skip(f"needs 8 devices; conftest gives 8 on CPU, {jax.default_backend()} has {len(jax.devices())}")
    return Mesh(np.array(jax.devices()), ("tp",))


def test_block_column_and_row_parallel_equal_one_device(key, mesh):
    kernel, bias, _ = float_layer(key, 1024, 1024)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, weight_granularity="block", fp8_dtype=FP8)
    x = jax.random.normal(jax.random.fold_in(key, 3), (2, 5, 1024)) * 2
    single = np.asarray(layer(x), np.float64).reshape(-1, 1024)
    column = jax.jit(lambda x: sharding.column_parallel(x, layer, mesh=mesh, axis_name="tp"))(x)
    assert column.sharding.spec == PartitionSpec(None, None, "tp")
    reference.assert_gemm_close(np.asarray(column).reshape(-1, 1024), single, 1024, jnp.float32)
    row = jax.jit(lambda x: sharding.row_parallel(x, layer, mesh=mesh, axis_name="tp"))(
        jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, None, "tp")))
    )
    reference.assert_gemm_close(np.asarray(row).reshape(-1, 1024), single, 1024, jnp.float32)
    placed = sharding.shard_params(layer, mesh, "tp", "row")
    assert placed.weight_scale.sharding.spec == PartitionSpec(None, "tp")


def test_block_split_that_cuts_a_block_is_refused(key, mesh):
    kernel, bias, x = float_layer(key, 512, 512)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, weight_granularity="block", fp8_dtype=FP8)
    with pytest.raises(
        ValueError,
        match=r"column-parallel block fp8: N=512 over 8 devices of 'tp' gives shards of 64, "
        r"which must be a multiple of the weight block's bn=128",
    ):
        sharding.column_parallel(x, layer, mesh=mesh, axis_name="tp")
    with pytest.raises(ValueError, match=r"row-parallel block fp8: K=512 over 8 devices"):
        sharding.row_parallel(x, layer, mesh=mesh, axis_name="tp")


def test_block_layer_of_partial_blocks_runs_on_one_device_and_dicts_need_their_scheme(key):
    kernel, bias, x = float_layer(key, 200, 130)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, weight_granularity="block", fp8_dtype=FP8)
    one = Mesh(np.array(jax.devices()[:1]), ("tp",))
    want = np.asarray(layer(x), np.float64).reshape(-1, 130)
    for parallel in (sharding.column_parallel, sharding.row_parallel):
        out = jax.jit(lambda x, parallel=parallel: parallel(x, layer, mesh=one, axis_name="tp"))(x)
        reference.assert_gemm_close(np.asarray(out).reshape(-1, 130), want, 200, jnp.float32)
    with pytest.raises(ValueError, match="block-scaled parameters need their scheme="):
        sharding.shard_params(layer.params.to_dict(), one, "tp", "row")
