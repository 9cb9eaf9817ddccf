"""Fp8LinearOp end to end (quantize, dispatch, GEMM) against float64 NumPy; bucketing; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from w8a8_jax import Fp8LinearOp, bucket_rows, linear, platform, xla_per_token_w8a8_scaled_mm
from w8a8_jax.platform import FusedKernel

SCHEMES = ["static", "dynamic", "dynamic_per_token", "dynamic_per_token_ub"]


def make_layer(key, k, n, per_channel):
    """An fp8 weight (N, K) with its scale(s), quantized from a float weight, and a bias."""
    k1, k2 = jax.random.split(key)
    w = np.asarray(jax.random.normal(k1, (n, k)), np.float32) * 0.05
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max().reshape(1)
    weight_scale = (amax / 448).astype(np.float32)
    weight = reference.fp8_cast(w / weight_scale.reshape(-1, 1), jnp.float8_e4m3fn)
    bias = np.asarray(jax.random.normal(k2, (n,)), np.float32)
    return jnp.asarray(weight), jnp.asarray(weight_scale), jnp.asarray(bias)


def expected(x, weight, weight_scale, bias, scheme, input_scale=None, ub=None):
    """The float64 result of vLLM's Fp8LinearOp computed with the NumPy references."""
    x2d = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    if scheme == "static":
        q, s = reference.quant_static(x2d, input_scale), np.asarray(input_scale)
    elif scheme == "dynamic":
        q, s = reference.quant_dynamic_per_tensor(x2d)
    else:
        q, s = reference.quant_dynamic_per_token(x2d, ub)
    out = reference.scaled_mm(q, weight, s, weight_scale, bias)
    return out.reshape(*x.shape[:-1], -1)


def run(op, x, weight, weight_scale, bias, scheme, out_dtype=None):
    input_scale = jnp.array([0.01], jnp.float32) if scheme == "static" else None
    ub = jnp.array([2.5], jnp.float32) if scheme == "dynamic_per_token_ub" else None
    out = op.apply(
        x,
        weight,
        weight_scale,
        out_dtype=out_dtype,
        input_scale=input_scale,
        input_scale_ub=ub,
        bias=bias,
        use_per_token_if_dynamic=scheme.startswith("dynamic_per_token"),
    )
    return out, expected(x, weight, weight_scale, bias, scheme, input_scale, ub)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(1, 64), (7, 1024), (2, 17, 96)])
def test_apply(key, scheme, per_channel, dtype, shape):
    k1, k2 = jax.random.split(key)
    x = (jax.random.normal(k1, shape) * 2).astype(dtype)
    weight, weight_scale, bias = make_layer(k2, shape[-1], 48, per_channel)
    out, ref = run(Fp8LinearOp(fused_supported=False), x, weight, weight_scale, bias, scheme)
    assert out.shape == (*shape[:-1], 48) and out.dtype == dtype
    reference.assert_gemm_close(out, ref, shape[-1], dtype)


@pytest.mark.parametrize("pad_output", [False, True])
def test_jit_equals_eager(key, pad_output):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (3, 11, 128), jnp.bfloat16)
    weight, weight_scale, bias = make_layer(k2, 128, 64, per_channel=True)
    op = Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True, pad_output=pad_output)
    eager = op.apply(x, weight, weight_scale, bias=bias)
    jitted = jax.jit(lambda *a: op.apply(*a, bias=bias))(x, weight, weight_scale)
    if pad_output:  # eager runs the padded M: a GPU GEMM may pick another algorithm for it
        reference.assert_gemm_close(jitted, np.asarray(eager, np.float64), 128, jnp.bfloat16)
    else:
        np.testing.assert_array_equal(np.asarray(jitted, np.float32), np.asarray(eager, np.float32))


def test_out_dtype_and_fp8_input(key):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (9, 64), jnp.float32)
    weight, weight_scale, bias = make_layer(k2, 64, 32, per_channel=False)
    op = Fp8LinearOp(fused_supported=False)
    out, ref = run(op, x, weight, weight_scale, bias, "dynamic", out_dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    reference.assert_gemm_close(out, ref, 64, jnp.bfloat16)
    # Pre-quantized fp8 input skips quantization and uses its input_scale.
    codes = jnp.asarray(reference.quant_static(x, 0.02))
    out = op.apply(codes, weight, weight_scale, input_scale=jnp.array([0.02]), bias=bias)
    assert out.dtype == jnp.bfloat16
    reference.assert_gemm_close(out, reference.scaled_mm(codes, weight, [0.02], weight_scale, bias), 64, jnp.bfloat16)


def test_buckets_bound_compiles_and_keep_results(key):
    """M in 1..4096 runs through one compiled program per bucket (28 in all), results unchanged.

    Each bucket's both ends (its first M and itself), every M up to 16 and a random sample above
    (each new M also compiles the tiny pad and slice around the program, ~50 ms each on CPU, so
    all 4096 would make a slow test).
    """
    k1, k2, k3 = jax.random.split(key, 3)
    weight, weight_scale, bias = make_layer(k2, 16, 16, per_channel=True)
    pool = jax.random.normal(k1, (4096, 16), jnp.float32)
    op = Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True)
    unpadded = Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True, pad_output=False)
    buckets = sorted({bucket_rows(m) for m in range(1, 4097)})
    ends = {1, *buckets, *(b + 1 for b in buckets[:-1])}
    sample = np.random.default_rng(int(jax.random.randint(k3, (), 0, 2**30))).integers(17, 4097, 16)
    rows = sorted({*range(1, 17), *ends, *sample.tolist()})
    linear._run_plan.clear_cache()
    for m in rows:
        op.apply(pool[:m], weight, weight_scale, bias=bias)
    assert linear._run_plan._cache_size() == len({bucket_rows(m) for m in rows})
    assert len({bucket_rows(m) for m in range(1, 4097)}) == 28
    for m in (1, 7, 65, 1025, 3001):  # padding rows change nothing in the rows kept
        padded = np.asarray(op.apply(pool[:m], weight, weight_scale, bias=bias))
        alone = np.asarray(unpadded.apply(pool[:m], weight, weight_scale, bias=bias))
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(padded, alone)
        else:  # GPU GEMMs sum in an order that depends on M (one row: a matrix-vector product)
            reference.assert_gemm_close(padded, alone.astype(np.float64), 16, padded.dtype)


@pytest.mark.parametrize("m, bucket", [(1, 8), (8, 8), (9, 16), (64, 64), (65, 80), (1025, 1280), (4096, 4096)])
def test_bucket_rows(m, bucket):
    assert bucket_rows(m) == bucket
    assert m <= bucket_rows(m) <= (max(8, 2 * m) if m <= 64 else 1.25 * m)


def test_fused_kernel_is_dispatched_where_shape_allows(key):
    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return xla_per_token_w8a8_scaled_mm(*args)

    fake = FusedKernel(scaled_mm=kernel, supports_device=lambda d: True, supports_shape=lambda k, n: n % 16 == 0)
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (5, 64), jnp.bfloat16)
    with platform.override(fused_kernel=fake):
        op = Fp8LinearOp(use_per_token_if_dynamic=True)
        assert op.fused_supported
        for n, fused in [(32, True), (40, False)]:
            calls.clear()
            weight, weight_scale, bias = make_layer(k2, 64, n, per_channel=True)
            out, ref = run(op, x, weight, weight_scale, bias, "dynamic_per_token")
            reference.assert_gemm_close(out, ref, 64, jnp.bfloat16)
            assert bool(calls) == fused


def test_fused_requested_without_kernel():
    with platform.override(fused_kernel=None):
        assert not Fp8LinearOp().fused_supported
        with pytest.raises(ValueError, match="no fused fp8 kernel"):
            Fp8LinearOp(fused_supported=True)


def _layer():
    return jnp.ones((8, 16), jnp.float32).astype(jnp.float8_e4m3fn), jnp.full((8, 1), 0.1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"input": jnp.ones((4, 15))}, ValueError, r"input must be \(..., K\) with K=16"),
        ({"input": jnp.ones((4, 16), jnp.int32)}, TypeError, "input must be bfloat16"),
        ({"weight": jnp.ones((8, 16))}, TypeError, "weight must be float8"),
        ({"weight_scale": jnp.ones((4, 1))}, ValueError, "weight_scale must be per-tensor"),
        ({"weight_scale": jnp.zeros((8, 1))}, ValueError, "weight_scale must be finite and > 0"),
        ({"input_scale": jnp.array([jnp.nan])}, ValueError, "input_scale must be finite and > 0"),
        ({"input_scale": jnp.ones((4, 1))}, ValueError, r"input_scale must have shape \(1,\)"),
        ({"input_scale_ub": jnp.array([1.0])}, ValueError, "input_scale_ub applies only"),
        (
            {"input_scale_ub": 0.0, "use_per_token_if_dynamic": True},
            ValueError,
            "input_scale_ub must be finite and > 0",
        ),
        ({"input_scale_ub": -1.0, "use_per_token_if_dynamic": True}, ValueError, "input_scale_ub must be finite"),
        ({"input_scale_ub": jnp.nan, "use_per_token_if_dynamic": True}, ValueError, "input_scale_ub must be finite"),
        ({"input_scale_ub": jnp.ones(2), "use_per_token_if_dynamic": True}, ValueError, r"input_scale_ub must have"),
        ({"input_scale": jnp.array([jnp.inf])}, ValueError, "input_scale must be finite and > 0"),
        ({"weight_scale": jnp.full((1,), -0.5)}, ValueError, "weight_scale must be finite and > 0"),
        ({"weight": jnp.ones((8, 0), jnp.float8_e4m3fn), "input": jnp.ones((4, 0))}, ValueError, "N, K >= 1"),
        ({"bias": jnp.ones(7)}, ValueError, r"bias must have shape \(8,\)"),
        ({"out_dtype": jnp.int32}, ValueError, "out_dtype must be"),
        ({"input": jnp.ones((4, 16)).astype(jnp.float8_e4m3fn)}, ValueError, "fp8 input needs its input_scale"),
    ],
)
def test_bad_input(kwargs, error, match):
    weight, weight_scale = _layer()
    args = {"input": jnp.ones((4, 16), jnp.bfloat16), "weight": weight, "weight_scale": weight_scale} | kwargs
    with pytest.raises(error, match=match):
        Fp8LinearOp(fused_supported=False).apply(**args)


def test_errors_raise_at_trace_time():
    weight, weight_scale = _layer()
    op = Fp8LinearOp(fused_supported=False)
    with pytest.raises(ValueError, match="K=16"):
        jax.jit(lambda x: op.apply(x, weight, weight_scale)).lower(jax.ShapeDtypeStruct((4, 15), jnp.bfloat16))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradient_is_the_straight_through_estimate(key, scheme, per_channel):
    """d/dx sum(g * y) = g @ dequant(weight) in float32, the bias gets sum_m g, and the fp8
    weight and its scale get zero cotangents; under jit as eagerly."""
    k1, k2, k3 = jax.random.split(key, 3)
    weight, weight_scale, bias = make_layer(k1, 96, 24, per_channel)
    x = jax.random.normal(k2, (2, 5, 96), jnp.float32)
    g = jax.random.normal(k3, (2, 5, 24), jnp.float32)
    op = Fp8LinearOp()

    def loss(x, weight, weight_scale, bias):
        out = op.apply(
            x,
            weight,
            weight_scale,
            input_scale=jnp.array([0.01], jnp.float32) if scheme == "static" else None,
            input_scale_ub=jnp.array([2.5], jnp.float32) if scheme == "dynamic_per_token_ub" else None,
            bias=bias,
            use_per_token_if_dynamic=scheme.startswith("dynamic_per_token"),
        )
        return jnp.sum(out * g)

    for grad in (jax.grad(loss, argnums=(0, 1, 2, 3)), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))):
        dx, dweight, dscale, dbias = grad(x, weight, weight_scale, bias)
        dequantized = np.asarray(weight).astype(np.float64) * np.asarray(weight_scale, np.float64).reshape(-1, 1)
        want = np.asarray(g, np.float64).reshape(-1, 24) @ dequantized
        assert dx.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(dx).reshape(-1, 96), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        want_bias = np.asarray(g, np.float64).sum(axis=(0, 1))
        np.testing.assert_allclose(np.asarray(dbias), want_bias, rtol=1e-5, atol=1e-6 * np.abs(want_bias).max())
        assert dweight.dtype == weight.dtype and not np.asarray(dweight, np.float32).any()
        assert not np.asarray(dscale).any()


def test_gradient_in_the_input_dtype(key):
    weight, weight_scale, _ = make_layer(key, 64, 8, True)
    x = jax.random.normal(key, (3, 64), jnp.bfloat16)
    dx = jax.grad(lambda x: Fp8LinearOp().apply(x, weight, weight_scale).astype(jnp.float32).sum())(x)
    want = np.ones((3, 8)) @ (np.asarray(weight).astype(np.float64) * np.asarray(weight_scale, np.float64))
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float64), want, rtol=2**-8)


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16)])
def test_no_rows(shape):
    weight, weight_scale = _layer()
    out = Fp8LinearOp().apply(jnp.ones(shape, jnp.bfloat16), weight, weight_scale, bias=jnp.ones(8))
    assert out.shape == (*shape[:-1], 8) and out.dtype == jnp.bfloat16
