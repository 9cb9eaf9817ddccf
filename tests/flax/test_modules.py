"""linen and nnx `Fp8Dense` against float64 NumPy references, for every scheme, and under transforms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tests import reference
from w8a8_jax import linen as fp8_linen
from w8a8_jax import nnx as fp8_nnx

FP8 = ml_dtypes.float8_e4m3fn
SCHEMES = [(w, a) for w in ("per_tensor", "per_channel") for a in ("static", "dynamic_per_tensor", "dynamic_per_token")]


def reference_weight(kernel, weight_granularity):
    """NumPy codes `(N, K)` and scale of a float `(K, N)` kernel: amax / 448 per tensor or per row."""
    weight = np.asarray(kernel, np.float32).T
    if weight_granularity == "per_tensor":
        codes, scale = reference.quant_dynamic_per_tensor(weight)
        return codes, scale
    return reference.quant_dynamic_per_token(weight)


def reference_dense(x, kernel, bias, weight_granularity, activation_scheme, input_scale=None, scale_ub=None):
    """float64 output of the fp8 layer, every quantization step emulated in NumPy."""
    w_codes, w_scale = reference_weight(kernel, weight_granularity)
    x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    if activation_scheme == "static":
        x_codes, x_scale = reference.quant_static(x2, input_scale), np.asarray(input_scale, np.float32)
    elif activation_scheme == "dynamic_per_tensor":
        x_codes, x_scale = reference.quant_dynamic_per_tensor(x2)
    else:
        x_codes, x_scale = reference.quant_dynamic_per_token(x2, scale_ub)
    out = reference.scaled_mm(x_codes, w_codes, x_scale, w_scale, bias)
    return out.reshape(*x.shape[:-1], -1), w_codes, w_scale


def random_layer(key, k, n, dtype=jnp.float32):
    k_kernel, k_bias, k_x = jax.random.split(key, 3)
    kernel = jax.random.normal(k_kernel, (k, n), jnp.float32) / np.sqrt(k)
    bias = jax.random.normal(k_bias, (n,), jnp.float32)
    x = jax.random.normal(k_x, (3, 7, k), dtype)
    return kernel, bias, x


@pytest.mark.parametrize("weight_granularity,activation_scheme", SCHEMES)
@pytest.mark.parametrize("family", ["linen", "nnx"])
def test_from_dense_matches_reference(key, family, weight_granularity, activation_scheme):
    k, n = 96, 40
    kernel, bias, x = random_layer(key, k, n)
    input_scale = np.array([0.0075], np.float32)  # below amax/448 for some values: exercises the clamp
    config = {"weight_granularity": weight_granularity, "activation_scheme": activation_scheme}
    if family == "linen":
        module, variables = fp8_linen.Fp8Dense.from_dense(kernel, bias, input_scale=input_scale, **config)
        params = variables["params"]
        out = module.apply(variables, x)
    else:
        layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, input_scale=input_scale, **config)
        params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
        out = layer(x)
    ref, w_codes, w_scale = reference_dense(x, kernel, bias, weight_granularity, activation_scheme, input_scale)
    # Weight quantization is exact (same codes, same scales), not merely close.
    np.testing.assert_array_equal(np.asarray(params["weight"]).view(np.uint8), w_codes.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(params["weight_scale"]).reshape(-1), w_scale.reshape(-1))
    assert ("input_scale" in params) == (activation_scheme == "static")
    assert out.shape == (3, 7, n) and out.dtype == x.dtype
    # Same codes on both sides, so only float32 accumulation and the output rounding differ.
    reference.assert_gemm_close(out.reshape(-1, n), ref.reshape(-1, n), k, out.dtype)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_scale_ub_and_out_dtype(key, out_dtype):
    k, n = 64, 24
    kernel, bias, x = random_layer(key, k, n, jnp.bfloat16)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias, scale_ub=1.5, dtype=out_dtype)
    out = layer(x)
    ref, _, _ = reference_dense(x, kernel, bias, "per_channel", "dynamic_per_token", scale_ub=np.float32(1.5))
    assert out.dtype == out_dtype
    reference.assert_gemm_close(out.reshape(-1, n), ref.reshape(-1, n), k, out_dtype)


def test_linen_init_params_run_unchanged_in_nnx(key):
    """A linen `Fp8Dense`'s randomly initialized parameters, wrapped by nnx's `from_fp8`, give the same output."""
    x = jax.random.normal(key, (4, 32), jnp.float32)
    variables = fp8_linen.Fp8Dense(16, activation_scheme="dynamic_per_tensor").init(jax.random.key(3), x)
    params = variables["params"]
    assert params["weight"].shape == (16, 32) and params["weight"].dtype == FP8
    assert params["weight_scale"].shape == (16, 1)
    layer = fp8_nnx.Fp8Dense.from_fp8(
        dict(params), scheme=fp8_linen.Fp8Dense(16, activation_scheme="dynamic_per_tensor").scheme
    )
    out_linen = fp8_linen.Fp8Dense(16, activation_scheme="dynamic_per_tensor").apply(variables, x)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(out_linen))


def test_static_needs_scale_and_bad_config_is_rejected():
    with pytest.raises(ValueError, match="scale_ub"):
        fp8_nnx.Fp8Dense(8, 8, activation_scheme="static", scale_ub=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_granularity"):
        fp8_nnx.Fp8Dense(8, 8, weight_granularity="per_block", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="K=8"):
        fp8_nnx.Fp8Dense(8, 4, rngs=nnx.Rngs(0))(jnp.ones((2, 9)))


def test_jit_vmap_nnx(key):
    kernel, bias, x = random_layer(key, 32, 16)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias)
    eager = layer(x)
    jitted = nnx.jit(lambda m, x: m(x))(layer, x)
    # vmap over the batch: per-token scales are per row, so mapping rows changes nothing.
    mapped = jax.vmap(lambda xb: layer(xb))(x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(eager))


def test_jit_vmap_linen(key):
    kernel, bias, x = random_layer(key, 32, 16)
    module, variables = fp8_linen.Fp8Dense.from_dense(kernel, bias, activation_scheme="static", input_scale=[0.01])
    eager = module.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(jax.jit(module.apply)(variables, x)), np.asarray(eager))
    mapped = jax.vmap(module.apply, in_axes=(None, 0))(variables, x)
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(eager))


def test_nn_scan_stack(key):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jax.nn.relu(fp8_linen.Fp8Dense(32, activation_scheme="dynamic_per_tensor")(x)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    x = jax.random.normal(key, (4, 32), jnp.float32)
    variables = stack.init(jax.random.key(1), x, None)
    assert variables["params"]["Fp8Dense_0"]["weight"].shape == (3, 32, 32)
    out, _ = jax.jit(stack.apply)(variables, x, None)
    expected = x
    for i in range(3):
        layer_vars = jax.tree.map(lambda a, i=i: a[i], variables)
        expected = jax.nn.relu(
            fp8_linen.Fp8Dense(32, activation_scheme="dynamic_per_tensor").apply(
                {"params": layer_vars["params"]["Fp8Dense_0"]}, expected
            )
        )
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_nnx_scan_stack(key):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rng_key):
        return fp8_nnx.Fp8Dense(32, 32, activation_scheme="dynamic_per_token", rngs=nnx.Rngs(rng_key))

    stack = make(jax.random.split(jax.random.key(2), 3))
    assert stack.weight[...].shape == (3, 32, 32)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, x):
        return jax.nn.relu(layer(x))

    x = jax.random.normal(key, (4, 32), jnp.float32)
    out = nnx.jit(run)(stack, x)
    expected = x
    for i in range(3):
        params = {name: getattr(stack, name)[...][i] for name in ("weight", "weight_scale", "bias")}
        expected = jax.nn.relu(fp8_nnx.Fp8Dense.from_fp8(params, scheme=stack.scheme)(expected))
    # Inside scan and eagerly the same XLA ops run per layer; float32 fusion may reassociate.
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_dense_refuses_non_finite_kernels(key, bad):
    kernel, bias, _ = random_layer(key, 32, 16)
    kernel = kernel.at[3, 5].set(bad)
    with pytest.raises(ValueError, match=r"kernel holds 1 NaN or Inf value: weights must be finite"):
        fp8_nnx.Fp8Dense.from_dense(kernel, bias)
    with pytest.raises(ValueError, match=r"kernel holds 1 NaN or Inf value"):
        fp8_linen.Fp8Dense.from_dense(kernel, bias)


def test_gradient_through_the_module_is_the_straight_through_estimate(key):
    """The input's gradient through `Fp8Dense` is `g @ dequant(weight)`; nnx.grad of the fp8
    parameters is zero (they are constants), the bias's is `sum_m g`."""
    kernel, bias, x = random_layer(key, 32, 16)
    layer = fp8_nnx.Fp8Dense.from_dense(kernel, bias)
    dx = jax.grad(lambda x: layer(x).sum())(x)
    params = layer.params
    dequantized = np.asarray(params.weight).astype(np.float64) * np.asarray(params.weight_scale, np.float64)
    want = np.ones((21, 16)) @ dequantized
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, 32), want, rtol=1e-5, atol=1e-6)
    grads = nnx.grad(lambda model: model(x).sum())(layer)
    assert not np.asarray(grads["weight_scale"][...]).any() and not np.asarray(grads["weight"][...], np.float32).any()
    np.testing.assert_allclose(np.asarray(grads["bias"][...]), np.full(16, 21.0), rtol=1e-6)
