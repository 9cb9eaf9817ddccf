"""The XLA scaled-GEMM paths and the dispatch tree, against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from w8a8_jax import (
    dispatch_w8a8_scaled_mm,
    fused_w8a8_scaled_mm,
    platform,
    quantization,
    xla_channelwise_w8a8_scaled_mm,
    xla_per_tensor_w8a8_scaled_mm,
    xla_per_token_w8a8_scaled_mm,
)
from w8a8_jax.platform import FusedKernel

PATHS = [xla_per_tensor_w8a8_scaled_mm, xla_per_token_w8a8_scaled_mm, xla_channelwise_w8a8_scaled_mm]
OUT_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def make_operands(key, m, k, n, per_token, per_channel, with_bias=True):
    """Random fp8 operands spanning the e4m3 range, positive scales, and a bias."""
    ks = jax.random.split(key, 5)
    qinput = jnp.asarray(reference.fp8_cast(np.asarray(jax.random.normal(ks[0], (m, k))) * 64, jnp.float8_e4m3fn))
    weight = jnp.asarray(reference.fp8_cast(np.asarray(jax.random.normal(ks[1], (n, k))) * 64, jnp.float8_e4m3fn))
    scale_a = jax.random.uniform(ks[2], (m, 1) if per_token else (1,), minval=0.5, maxval=2.0) * 1e-2
    scale_b = jax.random.uniform(ks[3], (n, 1) if per_channel else (1,), minval=0.5, maxval=2.0) * 1e-3
    bias = jax.random.normal(ks[4], (n,)) * 4 if with_bias else None
    return qinput, weight, scale_a, scale_b, bias


SHAPES = [(1, 16, 16), (7, 1024, 17), (17, 1025, 1024), (33, 5137, 33), (1025, 64, 1025)]


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_per_tensor(key, m, k, n, out_dtype):
    operands = make_operands(key, m, k, n, per_token=False, per_channel=False)
    out = xla_per_tensor_w8a8_scaled_mm(*operands, out_dtype)
    assert out.dtype == out_dtype
    reference.assert_gemm_close(out, reference.scaled_mm(*operands), k, out_dtype)


@pytest.mark.parametrize("path", [xla_per_token_w8a8_scaled_mm, xla_channelwise_w8a8_scaled_mm])
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("per_token, per_channel", [(True, True), (True, False), (False, True)])
def test_rowwise_paths(key, path, m, k, n, out_dtype, per_token, per_channel):
    operands = make_operands(key, m, k, n, per_token, per_channel)
    out = path(*operands, out_dtype)
    reference.assert_gemm_close(out, reference.scaled_mm(*operands), k, out_dtype)


@pytest.mark.parametrize("path", PATHS)
def test_no_bias_and_jit(key, path):
    per_row = path is not xla_per_tensor_w8a8_scaled_mm
    qinput, weight, scale_a, scale_b, _ = make_operands(key, 33, 256, 48, per_row, per_row)
    jitted = jax.jit(path, static_argnums=5)(qinput, weight, scale_a, scale_b, None, jnp.float32)
    reference.assert_gemm_close(jitted, reference.scaled_mm(qinput, weight, scale_a, scale_b), 256, jnp.float32)


@pytest.mark.parametrize("m", [9, 1])
@pytest.mark.parametrize("path", PATHS)
def test_quantize_and_gemm_in_one_program(key, path, m):
    """The codes, not the unquantized activations, reach the GEMM when one jitted program does both
    (XLA:GPU folds a bare `f32 -> fp8 -> f32` conversion chain away)."""
    per_row = path is not xla_per_tensor_w8a8_scaled_mm
    _, weight, _, scale_b, bias = make_operands(key, m, 96, 40, False, per_row)
    x = jax.random.normal(jax.random.key(7), (m, 96)) * 3
    scale_a = jnp.array([0.011], jnp.float32)

    def layer(x):
        return path(
            quantization.quantize_per_tensor(x, scale_a[0], jnp.float8_e4m3fn),
            weight,
            scale_a,
            scale_b,
            bias,
            jnp.float32,
        )

    ref = reference.scaled_mm(reference.quant_static(x, scale_a), weight, scale_a, scale_b, bias)
    reference.assert_gemm_close(jax.jit(layer)(x), ref, 96, jnp.float32)


def test_channelwise_upcast_follows_a_barrier(key):
    """What keeps XLA:GPU from folding `f32 -> fp8 -> f32` (the numeric test above fails on a GPU
    without it; on CPU only this structural check can)."""
    qinput, weight, scale_a, scale_b, bias = make_operands(key, 8, 32, 16, True, True)
    text = (
        jax.jit(xla_channelwise_w8a8_scaled_mm, static_argnums=5)
        .lower(qinput, weight, scale_a, scale_b, bias, jnp.float32)
        .as_text()
    )
    barrier = text.index("stablehlo.optimization_barrier")
    assert barrier < text.index("stablehlo.convert") < text.index("stablehlo.dot_general")


@pytest.mark.parametrize("path", [xla_per_tensor_w8a8_scaled_mm, xla_per_token_w8a8_scaled_mm])
def test_cuda_lowering_asks_for_float32_accumulation(monkeypatch, path):
    """XLA:GPU's default fp8 GEMM accumulates in the tensor cores' reduced precision (fast
    accumulation, 9e-3 relative error at K=14336 on an H100): on CUDA the paths name float32."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    per_tensor = path is xla_per_tensor_w8a8_scaled_mm
    args = (
        jax.ShapeDtypeStruct((32, 64), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((48, 64), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((1,) if per_tensor else (32, 1), jnp.float32),
        jax.ShapeDtypeStruct((1,) if per_tensor else (48, 1), jnp.float32),
    )
    text = (
        jax.jit(path, static_argnums=(4, 5))
        .trace(*args, None, jnp.bfloat16)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    (dot,) = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert "accumulation_type = f32" in dot and "allow_imprecise_accumulation = false" in dot, dot


@pytest.mark.parametrize("m, n", [(1, 48), (32, 1)], ids=["one_row", "one_column"])
def test_cuda_matrix_vector_products_sum_float32_products(monkeypatch, key, m, n):
    """XLA:GPU rejects the float32 fp8 algorithm for a matrix-vector product: there the paths sum
    float32 products instead (a reduction, no dot), which any backend can run and check."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    operands = make_operands(key, m, 640, n, True, True)
    for path in (xla_per_tensor_w8a8_scaled_mm, xla_per_token_w8a8_scaled_mm):
        args = (
            (*operands[:2], operands[2][:1], operands[3][:1]) if path is xla_per_tensor_w8a8_scaled_mm else operands[:4]
        )
        text = (
            jax.jit(path, static_argnums=(4, 5)).trace(*args, None, jnp.float32).lower(lowering_platforms=("cuda",))
        ).as_text()
        assert "dot_general" not in text
        # The codes are upcast behind a barrier, as in the channelwise path.
        assert text.index("stablehlo.optimization_barrier") < text.index("stablehlo.convert")
        out = path(*args, operands[4], jnp.float32)
        reference.assert_gemm_close(out, reference.scaled_mm(*args, operands[4]), 640, jnp.float32)


def test_cuda_lowering_leaves_e4m3fnuz_to_xla(monkeypatch):
    """CUDA has no float32 algorithm for e4m3fnuz codes; XLA's default upcasts them."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    fnuz = jax.ShapeDtypeStruct((32, 64), jnp.float8_e4m3fnuz)
    scale = jax.ShapeDtypeStruct((1,), jnp.float32)
    lowered = jax.jit(xla_per_tensor_w8a8_scaled_mm, static_argnums=(4, 5)).trace(
        fnuz, fnuz, scale, scale, None, jnp.float32
    )
    (dot,) = [
        line for line in lowered.lower(lowering_platforms=("cuda",)).as_text().splitlines() if "dot_general" in line
    ]
    assert "algorithm" not in dot, dot


def test_tolerance_catches_mistakes(key):
    """The tolerance is far tighter than what a wrong scale, transpose, bias or row would cause."""
    qinput, weight, scale_a, scale_b, bias = make_operands(key, 32, 64, 64, True, True)
    ref = reference.scaled_mm(qinput, weight, scale_a, scale_b, bias)
    wrong = [
        reference.scaled_mm(qinput, weight, scale_a, scale_b[::-1], bias),  # scales of other channels
        reference.scaled_mm(qinput, weight.T, scale_a, scale_b, bias),  # transposed (square) weight
        reference.scaled_mm(qinput, weight, scale_a, scale_b),  # dropped bias
        np.concatenate([ref[:-1], np.zeros_like(ref[-1:])]),  # missed row
    ]
    for candidate in wrong:
        with pytest.raises(AssertionError):
            reference.assert_gemm_close(candidate.astype(np.float32), ref, 64, jnp.bfloat16)


def test_e4m3fnuz_operands(key):
    qinput, weight, scale_a, scale_b, bias = make_operands(key, 17, 128, 24, True, True)
    # e4m3fnuz tops out at 240 (a cast beyond it is NaN): clip the e4m3fn codes before recasting.
    qinput, weight = (jnp.clip(t.astype(jnp.float32), -224, 224).astype(jnp.float8_e4m3fnuz) for t in (qinput, weight))
    out = xla_per_token_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), 128, jnp.float32)


@pytest.mark.parametrize(
    "fused, per_tensor_w, per_tensor_a, per_token, expected",
    [
        (True, True, True, False, fused_w8a8_scaled_mm),
        (True, False, False, True, fused_w8a8_scaled_mm),
        (False, True, True, False, xla_per_tensor_w8a8_scaled_mm),
        (False, True, True, True, xla_per_tensor_w8a8_scaled_mm),
        (False, False, False, True, xla_per_token_w8a8_scaled_mm),
        (False, False, False, False, xla_channelwise_w8a8_scaled_mm),
        (False, False, False, None, xla_channelwise_w8a8_scaled_mm),
        (False, False, True, False, xla_channelwise_w8a8_scaled_mm),
        (False, True, False, True, xla_channelwise_w8a8_scaled_mm),
        (False, False, True, True, xla_channelwise_w8a8_scaled_mm),
    ],
)
def test_dispatch_tree(fused, per_tensor_w, per_tensor_a, per_token, expected):
    assert dispatch_w8a8_scaled_mm(fused, per_tensor_w, per_tensor_a, per_token) is expected


def test_fused_without_kernel_raises(key):
    with platform.override(fused_kernel=None):
        assert not platform.fused_fp8_supported()
        with pytest.raises(NotImplementedError, match="no fused fp8 kernel"):
            fused_w8a8_scaled_mm(*make_operands(key, 8, 32, 16, True, True), jnp.bfloat16)


def test_fused_hands_over_to_registered_kernel(key):
    calls = []

    def kernel(*args):
        calls.append(args)
        return xla_per_token_w8a8_scaled_mm(*args)

    fake = FusedKernel(scaled_mm=kernel, supports_device=lambda d: True, supports_shape=lambda k, n: k % 16 == 0)
    operands = make_operands(key, 8, 32, 16, True, True)
    with platform.override(fused_kernel=fake):
        assert platform.fused_fp8_supported()
        out = fused_w8a8_scaled_mm(*operands, jnp.float32)
        with pytest.raises(ValueError, match="does not take K=17"):
            fused_w8a8_scaled_mm(*make_operands(key, 8, 17, 16, True, True), jnp.float32)
    assert len(calls) == 1
    reference.assert_gemm_close(out, reference.scaled_mm(*operands), 32, jnp.float32)


def _fp8(shape, dtype=jnp.float8_e4m3fn):
    return jnp.ones(shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((jnp.ones((4, 16)), _fp8((8, 16)), 1.0, 1.0, None, jnp.bfloat16), TypeError, "qinput must be float8"),
        ((_fp8((4, 16)), jnp.ones((8, 16)), 1.0, 1.0, None, jnp.bfloat16), TypeError, "weight must be float8"),
        ((_fp8((4, 16)), _fp8((8, 16, 1)), 1.0, 1.0, None, jnp.bfloat16), ValueError, "weight must be 2-D"),
        (
            (_fp8((4, 16)), _fp8((8, 32)), 1.0, 1.0, None, jnp.bfloat16),
            ValueError,
            r"weight must be \(N, K\) with K=16",
        ),
        ((_fp8((4, 16)), _fp8((8, 16), jnp.float8_e4m3fnuz), 1.0, 1.0, None, jnp.bfloat16), TypeError, "share one fp8"),
        (
            (_fp8((4, 16)), _fp8((8, 16)), jnp.ones((3, 1)), 1.0, None, jnp.bfloat16),
            ValueError,
            "scale_a must be per-tensor",
        ),
        (
            (_fp8((4, 16)), _fp8((8, 16)), 1.0, jnp.ones((4, 1)), None, jnp.bfloat16),
            ValueError,
            "scale_b must be per-tensor",
        ),
        (
            (_fp8((4, 16)), _fp8((8, 16)), 1.0, 1.0, jnp.ones(4), jnp.bfloat16),
            ValueError,
            r"bias must have shape \(8,\)",
        ),
        ((_fp8((4, 16)), _fp8((8, 16)), 1.0, 1.0, None, jnp.int8), ValueError, "out_dtype must be"),
        ((_fp8((4, 16)), _fp8((8, 16)), -1.0, 1.0, None, jnp.bfloat16), ValueError, "scale_a must be finite and > 0"),
        (
            (_fp8((4, 16)), _fp8((8, 16)), 1.0, jnp.full((8, 1), jnp.nan), None, jnp.bfloat16),
            ValueError,
            "scale_b must be finite",
        ),
    ],
)
def test_bad_operands(args, error, match):
    for path in PATHS:
        with pytest.raises(error, match=match):
            path(*args)


def test_per_tensor_path_rejects_rowwise_scales():
    with pytest.raises(ValueError, match="per-tensor scales only"):
        xla_per_tensor_w8a8_scaled_mm(_fp8((4, 16)), _fp8((8, 16)), jnp.ones((4, 1)), 1.0, None, jnp.bfloat16)
