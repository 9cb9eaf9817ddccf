"""The Hopper fp8 GEMM against the float64 reference: interpret mode on CPU, real shapes on H100."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from w8a8_jax import Fp8LinearOp, platform, scaled_mm
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import supports_device
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

on_hopper = jax.devices()[0].platform == "gpu" and supports_device(jax.devices()[0])
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def tensor_core_tolerance(k: int, out_dtype) -> float:
    """`reference.gemm_tolerance` with the fp8 tensor cores' accumulation floor, also in interpret
    mode, so one bound tells a promoting kernel from one that is not (see `TENSOR_CORE_FLOOR`)."""
    return max(reference.gemm_tolerance(k, out_dtype), reference.TENSOR_CORE_FLOOR)


def _operands(key, m, k, n, granularity, with_bias, out_dtype):
    ka, kb, ks, kt, kbias = jax.random.split(key, 5)
    qinput = jax.random.uniform(ka, (m, k), jnp.float32, -2, 2).astype(jnp.float8_e4m3fn)
    weight = jax.random.uniform(kb, (n, k), jnp.float32, -2, 2).astype(jnp.float8_e4m3fn)
    if granularity == "rowwise":
        scale_a = jax.random.uniform(ks, (m, 1), jnp.float32, 0.01, 0.1)
        scale_b = jax.random.uniform(kt, (n, 1), jnp.float32, 0.01, 0.1)
    else:
        scale_a = jax.random.uniform(ks, (1,), jnp.float32, 0.01, 0.1)
        scale_b = jax.random.uniform(kt, (1,), jnp.float32, 0.01, 0.1)
    bias = jax.random.normal(kbias, (n,), jnp.float32).astype(out_dtype) if with_bias else None
    return qinput, weight, scale_a, scale_b, bias


def check(key, m, k, n, granularity, with_bias, out_dtype, *, interpret, config=None):
    qinput, weight, scale_a, scale_b, bias = _operands(key, m, k, n, granularity, with_bias, out_dtype)
    with platform.override(num_sms=2) if interpret else _nullcontext():
        out = gpu_mm.scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype, interpret=interpret, config=config)
    assert out.dtype == jnp.dtype(out_dtype) and out.shape == (m, n)
    ref = reference.scaled_mm(qinput, weight, scale_a, scale_b, bias)
    out64 = reference.to_np(out).astype(np.float64)
    assert np.isfinite(out64).all(), "non-finite output"
    err = np.abs(out64 - ref).max() / np.abs(ref).max()
    tol = tensor_core_tolerance(k, out_dtype)
    assert err <= tol, f"max error {err:.3g} (relative to max |ref|) exceeds {tol:.3g}"


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Interpret mode on CPU: decode-sized and larger M (padded to the CTA rows), odd M,
# per-tensor and rowwise scales, bias or not, every out dtype. Small K and N keep it fast.
@pytest.mark.parametrize(
    "m, granularity, with_bias, out_dtype",
    [
        (1, "rowwise", True, jnp.bfloat16),
        (7, "per_tensor", False, jnp.float16),
        (17, "rowwise", False, jnp.float32),
        (33, "per_tensor", True, jnp.bfloat16),
        (65, "rowwise", True, jnp.float32),
        (130, "per_tensor", False, jnp.bfloat16),
        (129, "rowwise", True, jnp.float16),
    ],
)
def test_interpret(key, m, granularity, with_bias, out_dtype):
    check(key, m, 256, 256, granularity, with_bias, out_dtype, interpret=True)


def test_interpret_without_promotion_and_wide_n(key):
    # The unpromoted accumulator and a CTA tile stacked along N (128 x 256).
    config = tbs.GemmConfig(tile_m=128, tile_n=128, wg_split="n", promote=False)
    check(key, 100, 384, 512, "rowwise", True, jnp.bfloat16, interpret=True, config=config)


@pytest.mark.parametrize(
    "config",
    [
        tbs.GemmConfig(persistent_pipeline=True, stages=2),
        tbs.GemmConfig(cluster="m", persistent_pipeline=True, stages=2),
        tbs.GemmConfig(tile_n=256, epi_tile_n=32, cluster="m", persistent_pipeline=True, stages=2),
        tbs.GemmConfig(tile_n=256, epi_tile_n=32, cluster="m", persistent_pipeline=True, stages=2, promote_n=64),
    ],
    ids=[
        "persistent",
        "cluster_persistent",
        "cluster_persistent_promoted_in_two_chunks",
        "cluster_persistent_promoted_in_four_chunks",
    ],
)
def test_interpret_pipeline_variants(key, config):
    # 3 x 2 output tiles over 2 SMs: each SM's pipeline starts, runs steady and stops.
    check(key, 300, 1024, 256, "rowwise", True, jnp.bfloat16, interpret=True, config=config)


def test_fit_stages_persistent_pipeline():
    config = tbs.GemmConfig(persistent_pipeline=True, stages=4)
    assert tbs.fit_stages(config, 2, k=128 * 12).stages == 4
    assert tbs.fit_stages(config, 2, k=128 * 9).stages == 3
    off = tbs.fit_stages(config, 2, k=128 * 7)
    assert not off.persistent_pipeline and off.stages == 4


@pytest.mark.parametrize(
    "m, n, cta, cluster",
    [
        (4096, 6144, (128, 256), "m"),  # the default, 128x256 CTAs paired along M
        (1024, 6144, (128, 128), "m"),  # wide: 96 clusters on 66 slots leave 27% of the last wave idle
        (1024, 8192, (128, 256), "m"),  # 128 clusters, as full as the narrow config's 256
        (4096, 384, (128, 128), "m"),  # N not a multiple of the wide tile's 256
        (128, 28672, (128, 128), "n"),  # one CTA row: narrow tiles, paired along N
        (100, 384, (128, 128), None),  # one CTA row and N too narrow to pair
    ],
)
def test_gemm_config_by_shape(m, n, cta, cluster):
    config = tbs.gemm_config(m, 4096, n, 2, num_sms=132)
    assert (config.cta_m, config.cta_n, config.cluster) == (*cta, cluster)
    assert n % config.cluster_n == 0


def test_wave_efficiency():
    wide = tbs.DEFAULT_GEMM  # 256 x 256 of output a cluster, 66 cluster slots on 132 SMs
    assert tbs.wave_efficiency(wide, 1024, 6144, 132) == 96 / 132
    assert tbs.wave_efficiency(wide, 4096, 6144, 132) == 384 / 396
    assert tbs.wave_efficiency(tbs.GemmConfig(), 128, 128 * 132, 132) == 1.0
    assert tbs.wave_efficiency(wide, 256, 256, 1) == 1.0  # a one-SM device (CPU): one cluster slot


def test_interpret_on_a_one_core_device(key):
    # A CPU reports one core (`platform.num_sms`): the clustered grid still gets one cluster.
    qinput, weight, scale_a, scale_b, bias = _operands(key, 130, 256, 256, "rowwise", True, jnp.float32)
    with platform.override(num_sms=1):
        out = gpu_mm.scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32, interpret=True)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), 256, jnp.float32)


def test_fit_grid_keeps_persistent_pipeline_only_with_two_tiles_per_cta():
    config = tbs.GemmConfig(cluster="m", persistent_pipeline=True)  # cluster tile 256 x 128
    assert tbs.fit_grid(config, 1024, 128 * 66, num_sms=132).persistent_pipeline  # 264 tiles, 66 clusters
    assert tbs.fit_grid(config, 512, 128 * 66, num_sms=132).persistent_pipeline  # 132 tiles: 2 a cluster
    assert not tbs.fit_grid(config, 512, 128 * 65, num_sms=132).persistent_pipeline  # 130 tiles


def test_matches_xla_rowwise_path(key):
    qinput, weight, scale_a, scale_b, bias = _operands(key, 40, 256, 128, "rowwise", True, jnp.float32)
    with platform.override(num_sms=2):
        ours = gpu_mm.scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32, interpret=True)
    xla = scaled_mm.xla_per_token_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32)
    tol = reference.gemm_tolerance(256, jnp.float32)  # on a GPU, with the fp8 tensor cores' floor
    np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), rtol=tol, atol=tol * float(jnp.abs(xla).max()))


@pytest.mark.parametrize(
    "m, k, n, granularity",
    [(150, 272, 208, "rowwise"), (150, 144, 400, "per_tensor"), (5, 272, 48, "rowwise")],
    ids=["large_m", "large_m_per_tensor", "small_m"],
)
def test_interpret_shapes_padded_to_the_tiles(key, m, k, n, granularity):
    # K and N multiples of 16 but not of 128: zero-padded in the wrapper, sliced off after.
    assert gpu_mm.supports_shape(k, n)
    check(key, m, k, n, granularity, True, jnp.bfloat16, interpret=True)


@pytest.mark.parametrize(
    "k, n, message",
    [(200, 256, "K=200 must be a positive multiple of 16"), (256, 120, "N=120 must be a positive multiple of 16")],
)
def test_rejects_unsupported_shapes(k, n, message):
    qinput = jnp.zeros((4, k), jnp.float8_e4m3fn)
    weight = jnp.zeros((n, k), jnp.float8_e4m3fn)
    one = jnp.ones((1,), jnp.float32)
    assert not gpu_mm.supports_shape(k, n)
    with pytest.raises(ValueError, match=message):
        gpu_mm.scaled_mm(qinput, weight, one, one, None, jnp.bfloat16, interpret=True)


def test_rejects_unmeasured_dtypes():
    weight = jnp.zeros((128, 128), jnp.float8_e4m3fnuz)
    one = jnp.ones((1,), jnp.float32)
    with pytest.raises(NotImplementedError, match="float8_e4m3fn"):
        gpu_mm.scaled_mm(weight, weight, one, one, None, jnp.bfloat16, interpret=True)
    qinput = jnp.zeros((4, 128), jnp.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="out_dtype"):
        gpu_mm.scaled_mm(qinput, qinput, one, one, None, jnp.int8, interpret=True)


def test_registered_on_gpu_platform_only():
    cpu = jax.devices("cpu")[0]
    assert not supports_device(cpu)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize(
    "m, k, n, granularity, with_bias, out_dtype",
    [
        (1, 4096, 6144, "rowwise", True, jnp.bfloat16),
        (16, 4096, 28672, "per_tensor", False, jnp.float16),
        (33, 8192, 1024, "rowwise", True, jnp.float32),
        (1000, 4096, 6144, "rowwise", True, jnp.bfloat16),
        (4096, 4096, 1024, "per_tensor", False, jnp.float32),
        (257, 14336, 1024, "rowwise", False, jnp.float32),  # long K: promotion
        (8, 14336, 1024, "rowwise", False, jnp.float32),
        (300, 4112, 2000, "rowwise", True, jnp.bfloat16),  # K, N padded to the tiles
    ],
)
def test_hopper(key, m, k, n, granularity, with_bias, out_dtype):
    check(key, m, k, n, granularity, with_bias, out_dtype, interpret=False)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
def test_hopper_long_k_needs_promotion(key):
    """At K=14336 the unpromoted fp8 accumulator misses the tolerance that the promoted one meets."""
    qinput, weight, scale_a, scale_b, bias = _operands(key, 256, 14336, 512, "rowwise", False, jnp.float32)
    ref = reference.scaled_mm(qinput, weight, scale_a, scale_b, bias)
    errors = {}
    for promote in (True, False):
        config = tbs.GemmConfig(promote=promote)
        out = gpu_mm.scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.float32, config=config)
        errors[promote] = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    tol = tensor_core_tolerance(14336, jnp.float32)
    assert errors[True] <= tol < errors[False], errors


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
def test_hopper_dispatch_uses_kernel(key):
    assert platform.fused_fp8_supported()
    qinput, weight, scale_a, scale_b, bias = _operands(key, 512, 4096, 4096, "rowwise", True, jnp.bfloat16)
    out = scaled_mm.fused_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, bias, jnp.bfloat16)
    reference.assert_gemm_close(out, reference.scaled_mm(qinput, weight, scale_a, scale_b, bias), 4096, jnp.bfloat16)


def planned_gemm(m: int, k: int, n: int, per_token: bool = True) -> str:
    """The GEMM `Fp8LinearOp`'s plan picks for `(M, K) x (N, K)` with the registered Hopper kernel
    (its capabilities and measured rule) on an H200's 132 SMs, on any host: the shapes are traced,
    never allocated."""
    from w8a8_jax.kernels import gpu

    op = Fp8LinearOp(use_per_token_if_dynamic=per_token)
    plans = []

    def trace(x, weight, weight_scale):
        plans.append(op.plan(x, weight, weight_scale))
        return x

    args = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((n, 1), jnp.float32),
    )
    with platform.override(fused_kernel=gpu.FUSED_KERNEL, num_sms=132):
        jax.eval_shape(trace, *args)
    return plans[0].gemm


KERNEL, XLA = "fused_w8a8_scaled_mm", "xla_per_token_w8a8_scaled_mm"


@pytest.mark.parametrize(
    "m, k, n, gemm",
    [
        (4096, 4096, 28672, KERNEL),  # Llama-3-8B gate/up: 27 waves of clusters; measured 1.12x XLA
        (1024, 14336, 4096, KERNEL),  # Llama-3-8B down: 64 clusters, 0.97 of a wave; 1.02x
        (128, 4096, 28672, KERNEL),  # 112 CTAs paired along N: 1.7 waves; 1.09x
        (128, 14336, 4096, XLA),  # 16 clusters on 66 slots: cuBLASLt splits K (0.55x)
        (256, 4096, 6144, XLA),  # 48 of 66 slots (0.74x)
        (16, 4096, 28672, XLA),  # decode-sized M
        (1024, 3584, 4608, XLA),  # 2.2 waves, the last one 18% full: 0.73 of the slots busy (0.90x)
        (4096, 4096, 1000, XLA),  # N not a multiple of 16: not taken
        (4096, 4096, 384, XLA),  # N not a multiple of the wide tile: the narrow CTA only
        (1000, 4096, 6144, KERNEL),  # the plan's M bucket (1024) decides
    ],
)
def test_plan_routes_by_the_measured_rule(m, k, n, gemm):
    assert planned_gemm(m, k, n) == gemm


def test_rule_scales_with_the_machine():
    """The same shape fills a machine of fewer SMs sooner: the rule counts waves, not shapes."""
    assert not tbs.kernel_is_faster(256, 8192, 4096, num_sms=132)  # 16 clusters on 66 slots
    assert tbs.kernel_is_faster(256, 8192, 4096, num_sms=32)  # 16 on 16
    assert not tbs.kernel_is_faster(64, 8192, 57344, num_sms=132)  # decode-sized M whatever N


@pytest.mark.parametrize("promote_n", [32, 96, 256])
def test_config_rejects_promote_n(promote_n):
    with pytest.raises(ValueError, match="promote_n must be 64 or 128"):
        tbs.GemmConfig(tile_n=256, promote_n=promote_n)
