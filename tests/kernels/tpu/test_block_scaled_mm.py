"""The TPU block-scaled fp8 GEMM in interpret mode, against the float64 NumPy references of
`tests/reference.py`, written from the formula (never by calling the code under test):

  out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // bn, kb] * sum_{k in kb} q_a[m, k] * q_w[n, k] + bias[n]

which, the scales being constant on each block, is `dequant(q_a) @ dequant(q_w).T + bias` with the
codes times their scales in float64.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import w8a8_jax
from tests import reference
from tests.kernels.tpu.conftest import INTERPRET
from w8a8_jax import dispatch, layout, platform, quantization
from w8a8_jax.kernels import tpu
from w8a8_jax.kernels.tpu import BlockSizes, tuned_block_sizes
from w8a8_jax.kernels.tpu import block_scaled_mm as tpu_block

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = (128, 128)
SMALL = BlockSizes(32, 128, 128)  # the smallest legal tiles: several row blocks on small M


# Tolerance, relative to max |ref|. Every fp8 x fp8 product is exact in float32 (at most 8
# significant bits; the bf16 upcast is exact too), so the error is the float32 sums, the float32
# scale products and the one rounding to out_dtype: half an ulp of the largest output (bf16 2^-8,
# f16 2^-11, f32 2^-24; allowed twice that) plus the float32 accumulation of K terms of random
# sign, which grows like sqrt(K) * 2^-24 (allowed 4x). A scale taken from the wrong block, a
# transposed operand, a shifted or dropped row, or a dropped bias moves the result far more:
# `test_tolerance_catches_wrong_results` checks that each fails it.
def tolerance(k: int, out_dtype) -> float:
    unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}[np.dtype(out_dtype).name]
    return 2 * unit + 4 * np.sqrt(k) * 2.0**-24


def relative_error(out, ref) -> float:
    out = np.asarray(out).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def assert_close(out, ref, k, out_dtype) -> None:
    assert np.isfinite(np.asarray(out, np.float64)).all(), "non-finite output"
    err, tol = relative_error(out, ref), tolerance(k, out_dtype)
    assert err <= tol, f"max error {err:.3g} (relative to max |ref|) exceeds {tol:.3g}"


# --- operands --------------------------------------------------------------------------------------


def codes(key, shape, fp8_dtype=E4M3):
    """fp8 codes spanning the e4m3 range (clipped first: an out-of-range cast gives NaN)."""
    bound = 448.0 if np.dtype(fp8_dtype) == E4M3 else 224.0
    return jnp.clip(jax.random.normal(key, shape) * bound / 4, -bound, bound).astype(fp8_dtype)


def block_operands(key, m, k, n, block, *, with_bias, fp8_dtype=E4M3):
    """Codes and scales of distinct magnitudes per block (a wrong block index changes the result),
    an outlier first activation group (its scales 30x) and an all-zero second one."""
    (bn, bk), ks = block, jax.random.split(key, 5)
    kb, nb = layout.num_blocks(k, bk), layout.num_blocks(n, bn)
    q_a, q_w = codes(ks[0], (m, k), fp8_dtype), codes(ks[1], (n, k), fp8_dtype)
    scale_a = jax.random.uniform(ks[2], (m, kb), minval=0.5, maxval=2.0) * 1e-2
    scale_b = jax.random.uniform(ks[3], (nb, kb), minval=0.5, maxval=2.0) * 1e-3
    if kb > 1:
        scale_a = scale_a.at[:, 0].multiply(30.0)
    if kb > 2:  # never the last k-block, whose (partial) block must carry data
        q_a = q_a.at[:, bk : 2 * bk].set(0)
    bias = jax.random.normal(ks[4], (n,)) * 2 if with_bias else None
    return q_a, q_w, scale_a, scale_b, bias


def activations(key, m, k, dtype, group=128):
    """Float rows whose groups differ in magnitude over 3 decades, with an outlier first group (30x
    the row's largest other group) and an all-zero second group."""
    ks = jax.random.split(key, 2)
    groups = layout.num_blocks(k, group)
    magnitude = 10.0 ** jax.random.uniform(ks[0], (m, groups), minval=-2, maxval=1)
    if groups > 1:
        magnitude = magnitude.at[:, 0].set(30.0 * magnitude[:, 1:].max(axis=1))
    x = jax.random.normal(ks[1], (m, k)) * jnp.repeat(magnitude, group, axis=1)[:, :k]
    if groups > 2:
        x = x.at[:, group : 2 * group].set(0.0)
    return x.astype(dtype)


# --- the GEMM on fp8 codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, k, n, block, out_dtype, generation, blocks, with_bias",
    [
        (1, 576, 640, BLOCK, jnp.bfloat16, "v6e", None, True),  # decode; K, N not multiples of 128
        (7, 2112, 576, BLOCK, jnp.float16, "v7", None, False),  # 17 k-blocks, fp8 MXU operands
        (33, 576, 576, BLOCK, jnp.float32, "v6e", SMALL, True),  # 2 row blocks
        (130, 512, 256, BLOCK, jnp.bfloat16, "v7", None, True),  # block multiples
        # tile_k < bk and tile_n < bn: two k-steps per k-block, two n-tiles per block row; K, N
        # partial against the 256 blocks.
        (33, 576, 640, (256, 256), jnp.float32, "v6e", SMALL, True),
    ],
)
def test_block_gemm(key, m, k, n, block, out_dtype, generation, blocks, with_bias):
    q_a, q_w, scale_a, scale_b, bias = block_operands(key, m, k, n, block, with_bias=with_bias)
    out = tpu.w8a8_block_scaled_mm(
        q_a, q_w, scale_a, scale_b, block, bias, out_dtype, blocks=blocks, generation=generation, interpret=INTERPRET
    )
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert_close(out, reference.block_scaled_mm(q_a, q_w, scale_a, scale_b, block, bias), k, out_dtype)


def test_block_gemm_e4m3fnuz_under_jit(key):
    fnuz = np.dtype(ml_dtypes.float8_e4m3fnuz)
    q_a, q_w, scale_a, scale_b, bias = block_operands(key, 7, 300, 200, BLOCK, with_bias=True, fp8_dtype=fnuz)
    fn = jax.jit(
        lambda *a: tpu.w8a8_block_scaled_mm(*a, BLOCK, out_dtype=jnp.float32, generation="v7", interpret=INTERPRET)
    )
    out = fn(q_a, q_w, scale_a, scale_b)
    assert_close(out, reference.block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK), 300, jnp.float32)


def test_tolerance_catches_wrong_results(key):
    """The tolerance is tight: a scale from the wrong block, a transposed operand, a shifted or
    dropped row and a dropped bias each fail it at bf16 output (the loosest); at float32 output, so
    does a 0.1% error in one k-block's scales."""
    m, k, n = 33, 576, 576
    q_a, q_w, scale_a, scale_b, bias = block_operands(key, m, k, n, BLOCK, with_bias=True)
    out = tpu.w8a8_block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK, bias, jnp.bfloat16, interpret=INTERPRET)
    ref = reference.block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK, bias)
    assert_close(out, ref, k, jnp.bfloat16)
    wrong = {
        "scale_a of the next k-block": reference.block_scaled_mm(
            q_a, q_w, jnp.roll(scale_a, 1, axis=1), scale_b, BLOCK, bias
        ),
        "scale_a of the next row": reference.block_scaled_mm(
            q_a, q_w, jnp.roll(scale_a, 1, axis=0), scale_b, BLOCK, bias
        ),
        "scale_b of the next block row": reference.block_scaled_mm(
            q_a, q_w, scale_a, jnp.roll(scale_b, 1, axis=0), BLOCK, bias
        ),
        "scale_b of the next k-block": reference.block_scaled_mm(
            q_a, q_w, scale_a, jnp.roll(scale_b, 1, axis=1), BLOCK, bias
        ),
        "scale_b transposed": reference.block_scaled_mm(q_a, q_w, scale_a, scale_b.T, BLOCK, bias),
        "weight transposed": reference.block_scaled_mm(q_a, q_w.T, scale_a, scale_b, BLOCK, bias),
        "rows shifted": np.roll(ref, 1, axis=0),
        "last row dropped": np.concatenate([ref[:-1], np.zeros((1, n))]),
        "no bias": reference.block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK),
    }
    for what, bad in wrong.items():
        assert relative_error(out, bad) > tolerance(k, jnp.bfloat16), what
    out32 = tpu.w8a8_block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK, bias, jnp.float32, interpret=INTERPRET)
    assert_close(out32, ref, k, jnp.float32)
    slightly_off = reference.block_scaled_mm(q_a, q_w, scale_a.at[:, 3].multiply(1.001), scale_b, BLOCK, bias)
    assert relative_error(out32, slightly_off) > tolerance(k, jnp.float32)


# --- in-kernel quantization -----------------------------------------------------------------------


def check_quant_gemm(key, m, k, n, x_dtype, out_dtype, *, generation="v6e", blocks=None, fp8_dtype=E4M3):
    ks = jax.random.split(key, 2)
    x = activations(ks[0], m, k, x_dtype)
    _, q_w, _, scale_b, bias = block_operands(ks[1], 1, k, n, BLOCK, with_bias=True, fp8_dtype=fp8_dtype)
    out = tpu.fused_quant_block_scaled_mm(
        x, q_w, scale_b, BLOCK, bias, out_dtype, blocks=blocks, generation=generation, interpret=INTERPRET
    )
    assert out.dtype == np.dtype(out_dtype) and out.shape == (m, n)
    q_a, scale_a = reference.quant_per_token_group(x, BLOCK[1], fp8_dtype)
    assert_close(out, reference.block_scaled_mm(q_a, q_w, scale_a, scale_b, BLOCK, bias), k, out_dtype)


@pytest.mark.parametrize(
    "m, k, n, x_dtype, out_dtype, generation, blocks, fp8_dtype",
    [
        (1, 576, 640, jnp.bfloat16, jnp.bfloat16, "v6e", None, E4M3),
        (7, 2112, 576, jnp.float16, jnp.float32, "v7", None, E4M3),
        (33, 576, 640, jnp.float32, jnp.float16, "v6e", SMALL, E4M3),  # 2 row blocks, each cached
        (130, 576, 100, jnp.bfloat16, jnp.float32, "v7", None, E4M3),  # one N block: nothing to cache
        (7, 300, 256, jnp.float32, jnp.float32, "v7", None, np.dtype(ml_dtypes.float8_e4m3fnuz)),  # bf16 MXU on v7
    ],
)
def test_quant_block_gemm(key, m, k, n, x_dtype, out_dtype, generation, blocks, fp8_dtype):
    check_quant_gemm(key, m, k, n, x_dtype, out_dtype, generation=generation, blocks=blocks, fp8_dtype=fp8_dtype)


def test_cache_choice():
    """Several N blocks: the quantized row block is cached (N sequential); one N block: not."""
    args = {"x_dtype": jnp.bfloat16, "fp8_dtype": E4M3, "out_dtype": jnp.bfloat16, "quantize": True}
    assert tpu_block.plan_block_gemm(33, 576, 640, BLOCK, **args).cache_x
    assert not tpu_block.plan_block_gemm(33, 576, 100, BLOCK, **args).cache_x
    assert not tpu_block.plan_block_gemm(33, 576, 640, BLOCK, **{**args, "quantize": False}).cache_x
    # DeepSeek-V3's MLP up projection at 4096 tokens on v4 (16 MiB VMEM): tiles shrink to fit.
    plan = tpu_block.plan_block_gemm(4096, 7168, 18432, BLOCK, **args, generation="v4")
    assert plan.cache_x and plan.blocks == BlockSizes(256, 128, 128)


def _without_cache(monkeypatch):
    """Makes every cached plan look over the VMEM budget, so the kernel quantizes at each step."""
    estimate = tuned_block_sizes.block_gemm_vmem_bytes

    def no_room_to_cache(blocks, *, cached_k_steps=0, **kwargs):
        return estimate(blocks, **kwargs) + (1 << 40 if cached_k_steps else 0)

    monkeypatch.setattr(tuned_block_sizes, "block_gemm_vmem_bytes", no_room_to_cache)


def test_quant_block_gemm_without_cache(key, monkeypatch):
    _without_cache(monkeypatch)
    assert not tpu_block.plan_block_gemm(
        33, 576, 640, BLOCK, x_dtype=jnp.bfloat16, fp8_dtype=E4M3, out_dtype=jnp.float32, quantize=True
    ).cache_x
    check_quant_gemm(key, 33, 576, 640, jnp.bfloat16, jnp.float32, blocks=SMALL)


@pytest.mark.parametrize(
    "x_dtype, generation, cached", [(jnp.bfloat16, "v6e", True), (jnp.float32, "v7", True), (jnp.float16, "v6e", False)]
)
def test_in_kernel_codes_and_scales_are_exact(key, monkeypatch, x_dtype, generation, cached):
    """Identity weight, unit weight scales: out[m, n] = q[m, n] * s[m, n // bk] exactly (one float32
    product, every other term an exact zero), so the in-kernel codes and group scales are checked bit
    for bit against the NumPy reference and `quantize_per_token_group`. K = N = 576: a partial last
    group; the all-zero group gets the eps scale and the 30x group its own."""
    if not cached:
        _without_cache(monkeypatch)
    m, k = 33, 576
    x = activations(key, m, k, x_dtype)
    identity = jnp.eye(k, dtype=jnp.float32).astype(E4M3)
    unit = jnp.ones((layout.num_blocks(k, 128),) * 2, jnp.float32)
    out = tpu.fused_quant_block_scaled_mm(
        x, identity, unit, BLOCK, out_dtype=jnp.float32, blocks=SMALL, generation=generation, interpret=INTERPRET
    )
    want_q, want_scale = reference.quant_per_token_group(x, 128)
    xla_q, xla_scale = quantization.quantize_per_token_group(x, 128, E4M3)
    reference.assert_bit_identical(xla_q, want_q)
    reference.assert_bit_identical(xla_scale, want_scale)
    # + 0 turns the -0 of negative zero codes into the +0 a sum of products gives.
    want = want_q.astype(np.float32) * np.repeat(want_scale, 128, axis=1)[:, :k] + np.float32(0)
    reference.assert_bit_identical(out, want)
    assert (want_scale[:, 1] == np.float32(1e-10) / np.float32(448)).all()  # the all-zero group


# --- dispatch -------------------------------------------------------------------------------------


def counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(fn.func.__name__)
        return fn(*args, **kwargs)

    return wrapped


def test_registered_in_the_tpu_fused_kernel():
    kernel = platform._registry["tpu"]
    assert kernel.block_scaled_mm.func is tpu.w8a8_block_scaled_mm
    assert kernel.quant_block_scaled_mm.func is tpu.fused_quant_block_scaled_mm
    assert kernel.block_scaled_mm_supports.func is tpu.block_scaled_mm_supports
    assert kernel.quant_block_scaled_mm_supports.func is tpu.quant_block_scaled_mm_supports


# The XLA block GEMM the plan falls back to: dequantized on CPU (where its per-k-block products are slow).
XLA_GEMM = dispatch.XLA_BLOCK_DEQUANT_GEMM if jax.default_backend() == "cpu" else dispatch.XLA_BLOCK_GEMM


def test_op_runs_the_tpu_block_kernels_and_matches_xla(key):
    """W8A8BlockFp8LinearOp with the TPU kernel active plans the in-kernel quantizing GEMM for float
    input and the codes GEMM for fp8 input, runs them, and matches the XLA block path within float32
    rounding; a block the kernel cannot tile plans XLA's GEMM."""
    calls = []
    base = tpu.make_fused_kernel(interpret=INTERPRET)
    kernel = dataclasses.replace(
        base,
        block_scaled_mm=counting(base.block_scaled_mm, calls),
        quant_block_scaled_mm=counting(base.quant_block_scaled_mm, calls),
    )
    m, k, n = 9, 576, 384  # shapes of this test only, so the op's jit cache holds no other kernel
    ks = jax.random.split(key, 3)
    x = activations(ks[0], m, k, jnp.bfloat16)
    _, weight, _, weight_scale, bias = block_operands(ks[1], 1, k, n, BLOCK, with_bias=True)
    q_x, s_x = quantization.quantize_per_token_group(x, 128, E4M3)
    with platform.override(fused_kernel=None):
        xla = w8a8_jax.W8A8BlockFp8LinearOp()
        assert xla.plan(x, weight, weight_scale).gemm == XLA_GEMM
        want_float = xla.apply(x, weight, weight_scale, bias=bias, out_dtype=jnp.float32)
        want_codes = xla.apply(q_x, weight, weight_scale, input_scale=s_x, bias=bias, out_dtype=jnp.float32)
    with platform.override(fused_kernel=kernel):
        op = w8a8_jax.W8A8BlockFp8LinearOp()
        plan = op.plan(x, weight, weight_scale)
        assert (plan.quantizer, plan.gemm) == (dispatch.KERNEL_QUANT_BLOCK_SCALED_MM,) * 2, plan
        assert op.plan(q_x, weight, weight_scale, input_scale=s_x).gemm == dispatch.KERNEL_BLOCK_SCALED_MM
        out_float = op.apply(x, weight, weight_scale, bias=bias, out_dtype=jnp.float32)
        out_codes = op.apply(q_x, weight, weight_scale, input_scale=s_x, bias=bias, out_dtype=jnp.float32)
        # bn = 64: no tile_n (a multiple of 128) divides it.
        narrow = w8a8_jax.W8A8BlockFp8LinearOp(weight_group_shape=(64, 128))
        narrow_scale = jnp.ones((n // 64, layout.num_blocks(k, 128)), jnp.float32)
        assert narrow.plan(x, weight, narrow_scale).gemm == XLA_GEMM
    assert calls == ["fused_quant_block_scaled_mm", "w8a8_block_scaled_mm"], calls
    f32_rounding = tolerance(k, jnp.float32)
    assert relative_error(out_float, np.asarray(want_float, np.float64)) <= f32_rounding
    assert relative_error(out_codes, np.asarray(want_codes, np.float64)) <= f32_rounding
    x_codes, x_scales = reference.quant_per_token_group(x, 128)
    assert_close(
        out_float, reference.block_scaled_mm(x_codes, weight, x_scales, weight_scale, BLOCK, bias), k, jnp.float32
    )


# --- lowering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation, device_kind", [("v6e", "TPU v6 lite"), ("v7", "TPU7x")])
def test_lowers_to_mosaic(monkeypatch, generation, device_kind):
    """Each variant (codes; quantizing, cached and not; bf16 and f32 input) lowers through Pallas's
    TPU rules to a Mosaic custom call, on CPU, for an abstract TPU device. Mosaic's own compilation
    (layouts, VMEM) still needs a chip. `true_divide` chooses its division by the default backend:
    told "tpu", it traces the float32 division a TPU runs (the CPU one is float64, which TPUs lack)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    spec = jax.ShapeDtypeStruct
    m, k, f32 = 64, 576, jnp.float32

    def codes_gemm(q, w, sa, sb, b):
        return tpu.w8a8_block_scaled_mm(q, w, sa, sb, BLOCK, b, jnp.bfloat16, generation=generation)

    def quant_gemm(x, w, sb):
        return tpu.fused_quant_block_scaled_mm(x, w, sb, BLOCK, None, jnp.bfloat16, generation=generation)

    cases = [
        (codes_gemm, spec((m, k), E4M3), spec((640, k), E4M3), spec((m, 5), f32), spec((5, 5), f32), spec((640,), f32)),
        (quant_gemm, spec((m, k), jnp.bfloat16), spec((640, k), E4M3), spec((5, 5), f32)),  # cached
        (quant_gemm, spec((m, k), f32), spec((640, k), E4M3), spec((5, 5), f32)),
        (quant_gemm, spec((m, k), jnp.bfloat16), spec((100, k), E4M3), spec((1, 5), f32)),  # one N block
    ]
    # Traces are cached by argument, not by backend: none made for CPU is reused here, nor this one after.
    tpu_block._block_gemm.clear_cache()
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            for fn, *args in cases:
                exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
                assert "tpu_custom_call" in exported.mlir_module()
    finally:
        tpu_block._block_gemm.clear_cache()


# --- supports and errors --------------------------------------------------------------------------


def test_supports_predicates():
    bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
    assert tpu.block_scaled_mm_supports(7, 576, 640, BLOCK, E4M3)
    assert tpu.block_scaled_mm_supports(4096, 7168, 18432, BLOCK, E4M3, generation="v4")
    assert tpu.quant_block_scaled_mm_supports(1, 2112, 576, BLOCK, bf16, E4M3, f32)
    assert tpu.quant_block_scaled_mm_supports(4096, 7168, 18432, (256, 256), f32, E4M3, f32, generation="v7")
    for block in [(64, 128), (128, 64), (128, 192), (100, 128)]:  # no multiple of 128 divides both
        assert not tpu.block_scaled_mm_supports(7, 576, 640, block, E4M3), block
        assert not tpu.quant_block_scaled_mm_supports(7, 576, 640, block, bf16, E4M3, bf16), block
    assert not tpu.block_scaled_mm_supports(0, 576, 640, BLOCK, E4M3)
    assert not tpu.block_scaled_mm_supports(7, 576, 640, BLOCK, bf16)  # not an fp8 dtype
    assert not tpu.quant_block_scaled_mm_supports(7, 576, 640, BLOCK, np.dtype(np.int8), E4M3, bf16)
    # (N / 128) x (K / 128) float32 scales over half of the 1 MiB SMEM: 512 x 512 x 4 bytes.
    assert not tpu.block_scaled_mm_supports(7, 65536, 65536, BLOCK, E4M3)
    assert tpu.block_scaled_mm_supports(7, 32768, 32768, BLOCK, E4M3)


@pytest.mark.parametrize(
    "quantize, block, blocks, match",
    [
        (False, BLOCK, BlockSizes(32, 128, 256), "tile_k=256 must divide the block's bk=128"),
        (False, BLOCK, BlockSizes(32, 256, 128), "tile_n=256 must divide the block's bn=128"),
        (True, (128, 256), BlockSizes(32, 128, 128), "tile_k=128 must equal the block's bk=256"),
        (False, BLOCK, BlockSizes(16, 128, 128), "tile_m=16 must be a positive multiple of 32"),
        (False, (64, 128), None, r"block_size \(bn, bk\) = \(64, 128\): the TPU block GEMM needs bn and bk"),
        (True, (128, 96), None, r"block_size \(bn, bk\) = \(128, 96\)"),
    ],
)
def test_rejects_bad_tiling(key, quantize, block, blocks, match):
    m, k, n = 8, 512, 256
    q_a, q_w, scale_a, scale_b, _ = block_operands(key, m, k, n, block, with_bias=False)
    with pytest.raises(ValueError, match=match):
        if quantize:
            x = jnp.ones((m, k), jnp.bfloat16)
            tpu.fused_quant_block_scaled_mm(x, q_w, scale_b, block, blocks=blocks, interpret=INTERPRET)
        else:
            tpu.w8a8_block_scaled_mm(q_a, q_w, scale_a, scale_b, block, blocks=blocks, interpret=INTERPRET)


def test_rejects_bad_operands(key):
    q_a, q_w, scale_a, scale_b, _ = block_operands(key, 8, 576, 256, BLOCK, with_bias=False)
    gemm = tpu.w8a8_block_scaled_mm
    with pytest.raises(ValueError, match=r"scale_a must be \(8, 5\)"):
        gemm(q_a, q_w, scale_a[:, :4], scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"scale_b must be \(2, 5\)"):
        gemm(q_a, q_w, scale_a, scale_b.T, BLOCK, interpret=INTERPRET)
    with pytest.raises(ValueError, match="weight must be \\(N, K\\) with K=576"):
        gemm(q_a, q_w[:, :512], scale_a, scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(TypeError, match="share one fp8 dtype"):
        gemm(q_a, q_w.astype(jnp.float8_e4m3fnuz), scale_a, scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"bias must have shape \(256,\)"):
        gemm(q_a, q_w, scale_a, scale_b, BLOCK, jnp.ones((255,)), interpret=INTERPRET)
    with pytest.raises(ValueError, match="scale_b must be finite and > 0"):
        gemm(q_a, q_w, scale_a, -scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(TypeError, match="blocks must be a BlockSizes"):
        gemm(q_a, q_w, scale_a, scale_b, BLOCK, blocks=(32, 128, 128), interpret=INTERPRET)
    quant = tpu.fused_quant_block_scaled_mm
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) with K=500 \(x's last dim\)"):
        quant(jnp.ones((8, 500)), q_w, scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        quant(q_a, q_w, scale_b, BLOCK, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"scale_b must be \(2, 5\)"):
        quant(jnp.ones((8, 576)), q_w, scale_b[:, :4], BLOCK, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_size must be two ints"):
        quant(jnp.ones((8, 576)), q_w, scale_b, (128,), interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"need 1048576 bytes of SMEM, over the 524288 byte budget on TPU v6e"):
        tpu_block.plan_block_gemm(
            8, 65536, 65536, BLOCK, x_dtype=E4M3, fp8_dtype=E4M3, out_dtype=np.dtype(jnp.float32), quantize=False
        )
    with pytest.raises(ValueError, match=r"MiB of VMEM, over the 12.0 MiB budget on TPU v4"):
        gemm(q_a, q_w, scale_a, scale_b, BLOCK, blocks=BlockSizes(8192, 128, 128), generation="v4", interpret=INTERPRET)


def test_empty_rows():
    out = tpu.fused_quant_block_scaled_mm(
        jnp.ones((0, 256)), jnp.ones((128, 256), E4M3), jnp.ones((1, 2)), BLOCK, interpret=INTERPRET
    )
    assert out.shape == (0, 128) and out.dtype == jnp.float32
