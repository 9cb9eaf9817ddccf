"""Column- and row-parallel fp8 layers on 8 CPU devices equal the single-device layer, per scheme."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests import reference
from w8a8_jax import Fp8Params, Fp8Scheme, sharding
from w8a8_jax import nnx as fp8_nnx

SCHEMES = [(w, a) for w in ("per_tensor", "per_channel") for a in ("static", "dynamic_per_tensor", "dynamic_per_token")]


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) != 8:
        pytest.skip(
            f"needs 8 devices of one backend; conftest gives 8 on CPU, {jax.default_backend()} has {len(jax.devices())}"
        )
    return Mesh(np.array(jax.devices()), ("tp",))


def make_layer(key, weight_granularity, activation_scheme, k=128, n=64):
    k_kernel, k_bias, k_x = jax.random.split(key, 3)
    kernel = jax.random.normal(k_kernel, (k, n), jnp.float32) / np.sqrt(k)
    layer = fp8_nnx.Fp8Dense.from_dense(
        kernel,
        jax.random.normal(k_bias, (n,)),
        input_scale=jnp.array([0.006]),
        weight_granularity=weight_granularity,
        activation_scheme=activation_scheme,
    )
    x = jax.random.normal(k_x, (2, 5, k), jnp.float32)
    # Rows whose large values sit in different K shards: a per-shard amax would differ per shard.
    x = x.at[0, 0, 3].set(9.0).at[1, 2, 100].set(-7.0)
    return layer, x


@pytest.mark.parametrize("weight_granularity,activation_scheme", SCHEMES)
def test_column_parallel_equals_single_device(key, mesh, weight_granularity, activation_scheme):
    layer, x = make_layer(key, weight_granularity, activation_scheme)
    single = layer(x)
    sharded = jax.jit(lambda x: sharding.column_parallel(x, layer, mesh=mesh, axis_name="tp"))(x)
    assert sharded.sharding.spec == PartitionSpec(None, None, "tp")
    # Every output column is the same K-term dot and epilogue as on one device; XLA's CPU GEMM may
    # block a narrower N differently, so allow float32 accumulation error only.
    reference.assert_gemm_close(
        np.asarray(sharded).reshape(-1, 64), np.asarray(single, np.float64).reshape(-1, 64), 128, jnp.float32
    )


@pytest.mark.parametrize("weight_granularity,activation_scheme", SCHEMES)
def test_row_parallel_equals_single_device(key, mesh, weight_granularity, activation_scheme):
    layer, x = make_layer(key, weight_granularity, activation_scheme)
    single = layer(x)
    sharded = jax.jit(lambda x: sharding.row_parallel(x, layer, mesh=mesh, axis_name="tp"))(
        jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, None, "tp")))
    )
    # Same codes and scales (pmax of the amax); only the order of the float32 K sum differs (psum
    # of 8 partials), bounded by the float32 accumulation term of the GEMM tolerance.
    reference.assert_gemm_close(
        np.asarray(sharded).reshape(-1, 64), np.asarray(single, np.float64).reshape(-1, 64), 128, jnp.float32
    )


def test_row_parallel_per_token_uses_whole_row_amax(key, mesh):
    """Without the pmax each shard would scale by its own amax; check the scales the shards use."""
    _, x = make_layer(key, "per_channel", "dynamic_per_token")
    x2 = x.reshape(-1, 128)
    scheme = Fp8Scheme("per_channel", "dynamic_per_token", scale_ub=8.0)
    params = Fp8Params.create(jnp.ones((4, 128), jnp.float8_e4m3fn), jnp.ones((4, 1)))
    codes, scales = jax.shard_map(
        lambda xs: sharding._row_quantize(xs, params, scheme, "tp"),
        mesh=mesh,
        in_specs=PartitionSpec(None, "tp"),
        out_specs=(PartitionSpec(None, "tp"), PartitionSpec()),
        check_vma=False,
    )(x2)
    ref_codes, ref_scales = reference.quant_dynamic_per_token(np.asarray(x2), scale_ub=np.float32(8.0))
    np.testing.assert_array_equal(np.asarray(scales), ref_scales)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), ref_codes.view(np.uint8))


def test_param_specs_shard_scales_with_their_axis(mesh, key):
    layer, _ = make_layer(key, "per_channel", "static")
    placed = sharding.shard_params(layer, mesh, "tp", "column")
    assert placed.weight.sharding.spec == PartitionSpec("tp", None)
    assert placed.weight_scale.sharding.spec == PartitionSpec("tp", None)
    assert placed.bias.sharding.spec == PartitionSpec("tp")
    assert placed.input_scale.sharding.spec == PartitionSpec()
    row = sharding.param_specs(sharding.shard_params(layer, mesh, "tp", "row"), "tp", "row")
    assert row.weight == PartitionSpec(None, "tp") and row.weight_scale == PartitionSpec()


def test_column_parallel_takes_a_one_dimensional_per_channel_scale(key, mesh):
    """A per-channel `weight_scale (N,)` (as some checkpoints store it) is split on N like `(N, 1)`."""
    layer, x = make_layer(key, "per_channel", "dynamic_per_token")
    params = {name: getattr(layer, name)[...] for name in ("weight", "weight_scale", "bias")}
    params["weight_scale"] = params["weight_scale"].reshape(-1)
    assert sharding.param_specs(Fp8Params.from_dict(params), "tp", "column").weight_scale == PartitionSpec("tp", None)
    sharded = jax.jit(lambda x: sharding.column_parallel(x, params, mesh=mesh, axis_name="tp", scheme=layer.scheme))(x)
    w_codes = np.asarray(params["weight"])
    x_codes, x_scale = reference.quant_dynamic_per_token(np.asarray(x).reshape(-1, 128))
    ref = reference.scaled_mm(x_codes, w_codes, x_scale, np.asarray(params["weight_scale"]), np.asarray(params["bias"]))
    # Same codes as the reference: float32 accumulation of K=128 terms and output rounding only.
    reference.assert_gemm_close(np.asarray(sharded).reshape(-1, 64), ref, 128, jnp.float32)
