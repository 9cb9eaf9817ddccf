"""The Hopper block-scaled fp8 GEMM against the float64 reference of `tests/reference.py`,

  out[m, n] = sum_kb scale_a[m, kb] * scale_b[n // 128, kb] * sum_{k in kb} q_a[m, k] * q_w[n, k] + bias[n]

(the scales constant on each block: `dequant(q_a) @ dequant(q_w).T + bias` in float64): interpret
mode on CPU, the lowering for CUDA on any host, real shapes on a Hopper GPU. The activations carry
an outlier group (30x) and an all-zero group in every row, and the weight blocks differ in scale
(`tests/test_block_fp8.py`), so a scale taken from the wrong block or row shows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import w8a8_jax
from tests import reference
from tests.kernels.gpu.test_lowering import lowers_to_mosaic_gpu, spec
from tests.test_block_fp8 import activations, block_operands
from w8a8_jax import dispatch, layout, platform, quantization
from w8a8_jax.kernels import gpu
from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block
from w8a8_jax.kernels.gpu import group_quant, supports_device
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

on_hopper = jax.devices()[0].platform == "gpu" and supports_device(jax.devices()[0])
BLOCK = (128, 128)
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# The largest |sum| a float16 check allows: float16's range (65504) with room for the bias.
FLOAT16_ROOM = 2.0**15


def relative_error(out, ref) -> float:
    out = np.asarray(out).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def operands(key, m, k, n, with_bias):
    qinput, weight, scale_a, scale_b = block_operands(key, m, k, n)
    bias = jax.random.normal(jax.random.fold_in(key, 9), (n,)) * 10 if with_bias else None
    return qinput, weight, scale_a, scale_b, bias


def check(key, m, k, n, with_bias, out_dtype, *, interpret=True, config=None):
    qinput, weight, scale_a, scale_b, bias = operands(key, m, k, n, with_bias)
    ref = reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias)
    if jnp.dtype(out_dtype) == jnp.float16 and np.abs(ref).max() > FLOAT16_ROOM:
        # The outlier groups' sums can pass float16's 65504 (142,000 at 64 x 1536 x 24576): the
        # weight scales shrink by a power of two so they fit (the codes, and so the rounding, stay).
        shift = 2.0 ** np.ceil(np.log2(np.abs(ref).max() / FLOAT16_ROOM))
        scale_b = scale_b / shift
        ref = reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias)
    with platform.override(num_sms=2) if interpret else platform.override():
        out = gpu_block.block_scaled_mm(
            qinput, weight, scale_a, scale_b, BLOCK, bias, out_dtype, interpret=interpret, config=config
        )
    assert out.dtype == jnp.dtype(out_dtype) and out.shape == (m, n)
    err, tol = relative_error(out, ref), reference.gemm_tolerance(k, out_dtype)
    assert err <= tol, f"max error {err:.3g} (relative to max |ref|) exceeds {tol:.3g}"
    return err


# Interpret mode: decode-sized and larger M (padded to the cluster's rows), odd M, K and N that are
# not multiples of 128 (partial last blocks), bias or not, every out dtype; 2 SMs, so the persistent
# grid runs several tiles a CTA.
@pytest.mark.parametrize(
    "m, k, n, with_bias, out_dtype",
    [
        (1, 384, 256, True, jnp.bfloat16),
        (7, 200, 130, False, jnp.float16),
        (65, 640, 384, True, jnp.float32),
        (130, 512, 512, False, jnp.bfloat16),
        (300, 1152, 256, True, jnp.float32),
    ],
)
def test_interpret(key, m, k, n, with_bias, out_dtype):
    check(key, m, k, n, with_bias, out_dtype)


@pytest.mark.parametrize(
    "config",
    [
        tbs.DEFAULT_GEMM,  # CTA 128x256: two weight blocks a warpgroup, clusters along M
        tbs.NARROW_GEMM,
        tbs.GemmConfig(cluster="n", persistent_pipeline=True),  # the activation tile multicast
        tbs.GemmConfig(wg_split="n"),  # warpgroups side by side along N: each its own weight block
        tbs.GemmConfig(wg_split="n", tile_n=256),  # 4 weight blocks a CTA
        tbs.GemmConfig(tile_n=256, cluster=None, stages=2),
        # The weight-block scales through the pipeline: two blocks a CTA, then four.
        dataclasses.replace(tbs.DEFAULT_GEMM, pipelined_weight_scales=True),
        tbs.GemmConfig(wg_split="n", tile_n=256, pipelined_weight_scales=True),
        # 64-column chunks: two a weight block, each chunk its block's scale.
        dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64),
        tbs.GemmConfig(wg_split="n", tile_n=256, promote_n=64, pipelined_weight_scales=True),
    ],
    ids=str,
)
def test_interpret_schedules(key, config):
    check(key, 260, 768, 512, True, jnp.float32, config=config)


@pytest.mark.parametrize(
    "config",
    [
        tbs.NARROW_GEMM,
        tbs.GemmConfig(cluster="n"),  # the pair's second CTA wholly past N
        dataclasses.replace(tbs.NARROW_GEMM, k_splits=2, persistent_pipeline=False),  # sums, then the bias
    ],
    ids=str,
)
def test_interpret_last_tile_past_n(key, config):
    # N = 192: the weight is not padded; the last tile reads zeros past row 192 and writes no column
    # past it. N = 200 (off the 64-column store tile) is padded.
    for n in (192, 200):
        check(key, 256, 512, n, True, jnp.bfloat16, config=config)


@pytest.mark.parametrize(
    "config, out_dtype, columns",
    [(tbs.NARROW_GEMM, jnp.bfloat16, 64), (tbs.NARROW_GEMM, jnp.float32, 32), (tbs.DEFAULT_GEMM, jnp.bfloat16, 32)],
    ids=str,
)
def test_out_tile_columns(config, out_dtype, columns):
    assert gpu_mm.out_tile_columns(config, out_dtype) == columns


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="a CPU check: a GPU's wider float32 tolerance (the tensor cores' floor) passes a 0.1% scale error",
)
def test_tolerance_catches_wrong_scales(key):
    """At float32 output the check's tolerance fails a scale from the next k-block, row or weight
    block row, and a 0.1% error in one k-block's activation scales: the kernel's output is that
    close to the right sum only."""
    m, k, n = 70, 640, 256
    qinput, weight, scale_a, scale_b, bias = operands(key, m, k, n, True)
    with platform.override(num_sms=2):
        out = gpu_block.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias, jnp.float32, interpret=True)
    tol = reference.gemm_tolerance(k, jnp.float32)
    assert relative_error(out, reference.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, bias)) <= tol
    wrong = {
        "scale_a of the next k-block": (jnp.roll(scale_a, 1, axis=1), scale_b),
        "scale_a of the next row": (jnp.roll(scale_a, 1, axis=0), scale_b),
        "scale_b of the next block row": (scale_a, jnp.roll(scale_b, 1, axis=0)),
        "scale_b of the next k-block": (scale_a, jnp.roll(scale_b, 1, axis=1)),
        "one k-block's scale_a 0.1% off": (scale_a.at[:, 3].multiply(1.001), scale_b),
    }
    for what, (sa, sb) in wrong.items():
        assert relative_error(out, reference.block_scaled_mm(qinput, weight, sa, sb, BLOCK, bias)) > tol, what


def test_non_finite_code_stays_in_its_row(key):
    """A NaN activation code reaches its own row of the output only."""
    qinput, weight, scale_a, scale_b, _ = operands(key, 9, 384, 256, False)
    qinput = qinput.at[4, 300].set(jnp.nan)
    with platform.override(num_sms=2):
        out = np.asarray(
            gpu_block.block_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, None, jnp.float32, interpret=True)
        )
    assert np.isnan(out[4]).all() and np.isfinite(np.delete(out, 4, axis=0)).all()


def test_rejects_what_it_cannot_run(key):
    qinput, weight, scale_a, scale_b, _ = operands(key, 8, 256, 256, False)
    with pytest.raises(NotImplementedError, match=r"\(128, 128\) blocks"):
        gpu_block.block_scaled_mm(qinput, weight, scale_a, jnp.ones((4, 2)), (64, 128), None, interpret=True)
    with pytest.raises(NotImplementedError, match="float8_e4m3fn"):
        gpu_block.block_scaled_mm(
            qinput.astype(jnp.float8_e4m3fnuz), weight.astype(jnp.float8_e4m3fnuz), scale_a, scale_b, BLOCK
        )
    with pytest.raises(ValueError, match="promote=True"):
        gpu_block.block_scaled_mm(
            qinput, weight, scale_a, scale_b, BLOCK, config=tbs.GemmConfig(promote=False), interpret=True
        )
    with pytest.raises(ValueError, match="scale_b"):
        gpu_block.block_scaled_mm(qinput, weight, scale_a, scale_b.T[:1], BLOCK, interpret=True)
    assert gpu_block.block_scaled_mm(qinput[:0], weight, scale_a[:0], scale_b, BLOCK).shape == (0, 256)


def test_supports():
    assert gpu_block.supports(1, 7168, 2112, (128, 128), jnp.float8_e4m3fn)
    assert not gpu_block.supports(1, 7168, 2112, (64, 128), jnp.float8_e4m3fn)
    assert not gpu_block.supports(1, 7168, 2112, (128, 128), jnp.float8_e4m3fnuz)


def test_block_op_plans_and_runs_the_kernels(key):
    """With the block kernels in the Hopper fused kernel, W8A8BlockFp8LinearOp plans the group quant
    kernel and the block GEMM for float input, the GEMM alone for fp8 input, and matches the
    float64 sum; a block the GEMM cannot tile plans XLA's GEMM. Registered: the block GEMM, not
    yet the group quant."""
    calls = []

    def block_kernel(*args):
        calls.append("gemm")
        return gpu_block.block_scaled_mm(*args, interpret=True)

    def quant_kernel(*args):
        calls.append("quant")
        return group_quant.per_token_group_quant(*args, interpret=True)

    kernel = dataclasses.replace(gpu.FUSED_KERNEL, block_scaled_mm=block_kernel, per_token_group_quant=quant_kernel)
    m, k, n = 80, 640, 384  # past BLOCK_XLA_MAX_M and GROUP_QUANT_XLA_MAX_M: the kernels' M
    ks = jax.random.split(key, 2)
    x = activations(ks[0], m, k, jnp.bfloat16)
    _, weight, _, weight_scale = block_operands(ks[1], 1, k, n)
    q_x, s_x = quantization.quantize_per_token_group(x, 128, jnp.float8_e4m3fn)
    with platform.override(fused_kernel=kernel, num_sms=2):
        op = w8a8_jax.W8A8BlockFp8LinearOp()
        plan = op.plan(x, weight, weight_scale)
        assert (plan.quantizer, plan.gemm) == (dispatch.KERNEL_PER_TOKEN_GROUP_QUANT, dispatch.KERNEL_BLOCK_SCALED_MM)
        assert op.plan(q_x, weight, weight_scale, input_scale=s_x).gemm == dispatch.KERNEL_BLOCK_SCALED_MM
        out_float = op.apply(x, weight, weight_scale, out_dtype=jnp.float32)
        out_codes = op.apply(q_x, weight, weight_scale, input_scale=s_x, out_dtype=jnp.float32)
        # 64x128 blocks: the GEMM cannot tile them (XLA's runs), the group quant still takes K.
        narrow = w8a8_jax.W8A8BlockFp8LinearOp(weight_group_shape=(64, 128))
        narrow_scale = jax.random.uniform(ks[1], (n // 64, layout.num_blocks(k, 128)), jnp.float32, 1e-3, 2e-3)
        narrow_plan = narrow.plan(x, weight, narrow_scale)
        assert narrow_plan.quantizer == dispatch.KERNEL_PER_TOKEN_GROUP_QUANT, narrow_plan
        assert narrow_plan.gemm != dispatch.KERNEL_BLOCK_SCALED_MM
        out_narrow = narrow.apply(x, weight, narrow_scale, out_dtype=jnp.float32)
    assert calls == ["quant", "gemm", "gemm", "quant"], calls  # traced once for each program
    x_codes, x_scales = reference.quant_per_token_group(x, 128)
    ref = reference.block_scaled_mm(x_codes, weight, x_scales, weight_scale, BLOCK)
    for out in (out_float, out_codes):
        assert relative_error(out, ref) <= reference.gemm_tolerance(k, jnp.float32)
    ref_narrow = reference.block_scaled_mm(x_codes, weight, x_scales, narrow_scale, (64, 128))
    assert relative_error(out_narrow, ref_narrow) <= reference.gemm_tolerance(k, jnp.float32)
    assert gpu.FUSED_KERNEL.block_scaled_mm is gpu_block.block_scaled_mm
    assert gpu.FUSED_KERNEL.per_token_group_quant is group_quant.per_token_group_quant


@pytest.mark.parametrize(
    "m, traced, kernel, quant_kernel",
    [(1, True, False, False), (2, True, True, False), (1, False, True, False), (64, True, True, False)]
    + [(65, True, True, True), (4096, False, True, True)],
    ids=["traced_1", "traced_2", "eager_1_padded_to_8", "traced_64", "traced_65", "eager_4096"],
)
def test_registered_plan_routes_by_m(m, traced, kernel, quant_kernel):
    """The registered Hopper kernel's block GEMM runs from M = 2 (XLA's per-k-block GEMMs at one
    row, `tuned_block_sizes.BLOCK_XLA_MAX_M`), so also for one eagerly called row, which runs as the
    8 of its bucket (`bucket_rows`); its group quant above decode's 64 rows (XLA's formula below)."""
    x = jnp.ones((m, 7168), jnp.bfloat16)
    weight = jnp.ones((2112, 7168), jnp.float8_e4m3fn)
    weight_scale = jnp.ones((17, 56), jnp.float32)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    plans = []
    with platform.override(fused_kernel=gpu.FUSED_KERNEL):
        if traced:
            jax.eval_shape(lambda x: plans.append(op.plan(x, weight, weight_scale)) or x, x)
        else:
            plans.append(op.plan(x, weight, weight_scale))
    (plan,) = plans
    xla = (dispatch.XLA_BLOCK_GEMM, dispatch.XLA_BLOCK_DEQUANT_GEMM)
    assert plan.gemm == dispatch.KERNEL_BLOCK_SCALED_MM if kernel else plan.gemm in xla, plan
    quantizer = dispatch.KERNEL_PER_TOKEN_GROUP_QUANT if quant_kernel else dispatch.QUANTIZE_PER_TOKEN_GROUP
    assert plan.quantizer == quantizer, plan


@pytest.mark.parametrize("m, k, n", [(4096, 7168, 24576), (1024, 18432, 7168), (16, 7168, 24576)])
def test_default_schedule_takes_the_narrow_cta(m, k, n):
    """Where the rowwise kernel takes the wide 128x256 CTA, the block kernel takes the 128x128 one
    (`default_config(..., block_scales=True)`: the wide one spills with the block scales); at decode's M
    both take the swapped schedule."""
    rowwise = tbs.default_config(m, k, n, 2, 132)
    block = tbs.default_config(m, k, n, 2, 132, block_scales=True)
    if m <= tbs.DECODE_M:
        assert block == rowwise and block.swap_ab
    else:
        assert (rowwise.cta_m, rowwise.cta_n) == (128, 256)
        assert (block.cta_m, block.cta_n, block.cluster) == (128, 128, "m") and block.persistent_pipeline


@pytest.mark.parametrize(
    "m, k, n, config",
    [
        (4096, 7168, 2112, None),  # the narrow CTA, the last tile past N (2112 = 16.5 x 128)
        (300, 4100, 2000, None),  # N off the 64-column store tile: padded
        (1024, 7168, 24576, None),  # the narrow CTA, clusters along M
        (1024, 7168, 24576, tbs.DEFAULT_GEMM),  # the wide CTA: two weight blocks a warpgroup
        (64, 1536, 24576, None),  # the swapped decode schedule
        (512, 1024, 512, tbs.GemmConfig(wg_split="n")),
        (1024, 7168, 24576, dataclasses.replace(tbs.DEFAULT_GEMM, pipelined_weight_scales=True)),
        (16, 7168, 2112, dataclasses.replace(tbs.DECODE_GEMM, tile_n=16, pipelined_weight_scales=True)),
        (1024, 7168, 24576, dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64)),
    ],
    ids=str,
)
def test_lowers(m, k, n, config):
    kb = layout.num_blocks(k, 128)

    def fn(q, w, sa, sb, bias):
        return gpu_block.block_scaled_mm(q, w, sa, sb, BLOCK, bias, jnp.bfloat16, config=config)

    args = (
        spec((m, k), jnp.float8_e4m3fn),
        spec((n, k), jnp.float8_e4m3fn),
        spec((m, kb), jnp.float32),
        spec((layout.num_blocks(n, 128), kb), jnp.float32),
        spec((n,), jnp.bfloat16),
    )
    assert lowers_to_mosaic_gpu(fn, *args)


# --- on a Hopper GPU ------------------------------------------------------------------------------


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize(
    "m, k, n, with_bias, out_dtype",
    [
        (1, 7168, 2112, False, jnp.bfloat16),
        (64, 1536, 24576, True, jnp.float16),
        (1000, 7168, 2112, True, jnp.bfloat16),  # N padded to the block
        (4096, 2048, 7168, False, jnp.float32),
        (300, 4100, 2000, True, jnp.bfloat16),  # K, N padded: partial last blocks
    ],
)
def test_hopper(key, m, k, n, with_bias, out_dtype):
    check(key, m, k, n, with_bias, out_dtype, interpret=False)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize(
    "m, k, n, config",
    [
        (1024, 7168, 24576, dataclasses.replace(tbs.DEFAULT_GEMM, pipelined_weight_scales=True)),
        (300, 4100, 2000, dataclasses.replace(tbs.NARROW_GEMM, pipelined_weight_scales=True)),
        (16, 7168, 2112, dataclasses.replace(tbs.DECODE_GEMM, tile_n=16, pipelined_weight_scales=True)),
        (1024, 7168, 24576, dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64, pipelined_weight_scales=True)),
    ],
    ids=["wide", "narrow_partial_blocks", "swapped", "wide_64_column_chunks"],
)
def test_hopper_pipelined_weight_scales(key, m, k, n, config):
    check(key, m, k, n, True, jnp.bfloat16, interpret=False, config=config)


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("k", [7168, 18432])
def test_hopper_long_k_promotes_in_float32(key, k):
    """DeepSeek-V3's longest contractions: with each k-block's fp8 `wgmma` sum promoted into
    float32, the error stays within the tensor cores' per-k-block floor at any K (unpromoted fp8
    accumulation over K = 14336 measured 7e-3, `scaled_mm._mma_step`)."""
    err = check(key, 256, k, 512, False, jnp.float32, interpret=False)
    assert err <= reference.TENSOR_CORE_FLOOR
