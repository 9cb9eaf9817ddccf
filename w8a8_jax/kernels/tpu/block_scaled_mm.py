"""Pallas TPU kernel: block-scaled fp8 GEMM (DeepSeek-V3 / Qwen3-FP8), optionally quantizing the
activation per token group inside the kernel.

With weight blocks `(bn, bk)` and KB = ceil(K / bk) k-blocks (the last one partial where K is not
a multiple of bk), the kernel computes

  out[m, n] = round_out( sum_kb (scale_a[m, kb] * scale_b[n // bn, kb]) * P_kb[m, n]  + bias[n] )
  P_kb[m, n] = sum_{k in k-block kb} q_a[m, k] * q_w[n, k]

in float32 throughout: the MXU product P of each k-step in float32, times that step's product
scale `scale_a[:, kb] * scale_b[nb, kb]` (one float32 product per row, as the XLA path forms it),
added to a float32 VMEM accumulator in k order; bias added and one rounding to `out_dtype` in the
epilogue of the last k-step. Where tile_k < bk a k-block's product arrives in bk / tile_k parts,
each scaled by the same scale: the same sum, rounded in float32 part by part.

  grid (M / tile_m, N / tile_n, K / tile_k), K last and sequential ("arbitrary");
  tile_k divides bk, so each k-step lies in one k-block, kb = k-step * tile_k // bk;
  tile_n divides bn, so each n-tile lies in one weight block row, nb = n-tile * tile_n // bn, and
    its weight scale is one scalar: `scale_b` is held whole in SMEM (flattened; within half of
    the core's SMEM) and read per step;
  `scale_a (M, KB)` arrives k-block first, `(KB, M, 1)`: one `(tile_m, 1)` VMEM column per k-step;
  weight `(N, K)` contracted on K of both operands (no transpose in HBM);
  zero codes pad K to tile_k and N to tile_n (they add exact zeros to every product), rows pad to
    tile_m with scale 1; the wrapper slices the padding off.
MXU operands are the fp8 codes on v7 and bfloat16 elsewhere (exact upcast in VMEM; HBM traffic
stays fp8): `hardware.mxu_dtype`.

In-kernel quantization (`fused_quant_block_scaled_mm`): each k-step's float activation tile is one
group per row, `(tile_m, bk)` (so tile_k == bk), quantized by `quantization.quantize_per_token_group`
itself: `s = max(amax, eps) / fp8_max`, `q = fp8(clamp(x / s))`, codes and scales bit-identical to
the XLA quantizer's (zero K padding leaves a partial group's amax unchanged; a zero padding row
gets codes 0). Where the quantized row block (K / bk code tiles in the MXU dtype and their scale
columns) fits VMEM next to the GEMM's blocks and there is more than one N block, it is quantized
once per row block, during the first N block, and reused by every other N block: the N axis is
then sequential ("arbitrary"), so that the first N block runs first on the core that owns the row
block, and the activation is read from HBM once. Otherwise every (N, K) step quantizes its tile
again and the N axis is "parallel".

The tile rule (`tuned_block_sizes.default_block_gemm_sizes`: tile_k = bk, or its largest divisor
up to the generation's cap; tile_n the largest divisor of bn up to the cap, e.g. 128 for 128x128
blocks) was not tuned: no TPU was available. This block path was verified in TPU interpret mode on
CPU only, plus Pallas's lowering of it to a Mosaic custom call; Mosaic's compilation of it, the
VMEM and SMEM estimates and any speed were not checked on a chip.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from w8a8_jax import block_scaled_mm as block_lib
from w8a8_jax import dtypes, layout, quantization, validation
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.kernels.tpu import hardware, tuned_block_sizes
from w8a8_jax.kernels.tpu.tuned_block_sizes import BlockSizes


@dataclasses.dataclass(frozen=True)
class BlockGemmPlan:
    """How one block GEMM call runs (static: part of the compilation key).

    Attributes:
      blocks: the tiles, checked against the TPU tiling rules and the weight blocks.
      mxu_dtype: the MXU operand dtype (`hardware.mxu_dtype`).
      cache_x: whether the in-kernel quantized row block is kept in VMEM across N blocks.
      vmem_limit: `vmem_limit_bytes` to compile with.
    """

    blocks: BlockSizes
    mxu_dtype: np.dtype
    cache_x: bool
    vmem_limit: int


def _block_gemm_kernel(
    scale_b_smem,
    *refs,
    quantize: bool,
    cache_x: bool,
    has_bias: bool,
    k_blocks: int,
    steps_per_k_block: int,
    tiles_per_n_block: int,
    group: int,
    fp8_dtype,
    mxu_dtype,
):
    refs = list(refs)
    # The SMEM scales first, then blocks (VMEM), then the output and scratch; see `_block_gemm`.
    x_vmem = refs.pop(0)  # (tm, tk): fp8 codes, or float rows quantized here
    w_vmem = refs.pop(0)  # (tn, tk) fp8
    scale_a_vmem = None if quantize else refs.pop(0)  # (tm, 1) f32, this k-block's activation scales
    bias_vmem = refs.pop(0) if has_bias else None  # (1, tn) f32
    out_vmem = refs.pop(0)  # (tm, tn) out_dtype
    acc_vmem = refs.pop(0)  # (tm, tn) f32
    xq_vmem = refs.pop(0) if cache_x else None  # (k_steps, tm, tk) mxu_dtype: the quantized row block
    xs_vmem = refs.pop(0) if cache_x else None  # (k_steps, tm, 1) f32: its group scales
    assert not refs

    n_idx, k_idx = pl.program_id(1), pl.program_id(2)
    scale_b = scale_b_smem[(n_idx // tiles_per_n_block) * k_blocks + k_idx // steps_per_k_block]

    def quantize_group():
        q, scale = quantization.quantize_per_token_group(x_vmem[...], group, fp8_dtype)
        return q.astype(mxu_dtype), scale

    if not quantize:
        x_mxu, scale_a = x_vmem[...].astype(mxu_dtype), scale_a_vmem[...]
    elif cache_x:

        @pl.when(n_idx == 0)
        def _quantize_once():
            xq_vmem[k_idx], xs_vmem[k_idx] = quantize_group()

        x_mxu, scale_a = xq_vmem[k_idx], xs_vmem[k_idx]
    else:
        x_mxu, scale_a = quantize_group()

    @pl.when(k_idx == 0)
    def _zero():
        acc_vmem[...] = jnp.zeros_like(acc_vmem)

    product = jax.lax.dot_general(
        x_mxu, w_vmem[...].astype(mxu_dtype), layout.CONTRACT_K, preferred_element_type=jnp.float32
    )
    acc_vmem[...] += product * (scale_a * scale_b)

    @pl.when(k_idx == pl.num_programs(2) - 1)
    def _epilogue():
        out = acc_vmem[...]
        if bias_vmem is not None:
            out = out + bias_vmem[...]
        out_vmem[...] = out.astype(out_vmem.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "plan", "out_dtype", "fp8_dtype", "interpret"))
def _block_gemm(x, weight, scale_a, scale_b, bias, *, block_size, plan, out_dtype, fp8_dtype, interpret):
    """Pads to tile multiples, runs the kernel, slices. `scale_a` None: `x` is float, quantized here."""
    (m, k), n = x.shape, weight.shape[0]
    (bn, bk), blocks = block_size, plan.blocks
    tm, tn, tk = blocks.tile_m, blocks.tile_n, blocks.tile_k
    m_pad, n_pad, k_pad = (layout.round_up(v, t) for v, t in ((m, tm), (n, tn), (k, tk)))
    grid = (m_pad // tm, n_pad // tn, k_pad // tk)
    quantize = scale_a is None
    steps_per_k_block = bk // tk

    x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
    weight = jnp.pad(weight, ((0, n_pad - n), (0, k_pad - k)))
    if plan.cache_x:
        last_k = grid[2] - 1

        # After the first N block the cached codes stand in for x: its block index stays where the
        # first N block left it, so no further copy of x is issued.
        def x_index(i, j, kk):
            return i, jnp.where(j == 0, kk, last_k)

    else:

        def x_index(i, j, kk):
            return i, kk

    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((tm, tk), x_index),
        pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
    ]
    operands = [scale_b.reshape(-1), x, weight]
    if not quantize:
        in_specs.append(pl.BlockSpec((None, tm, 1), lambda i, j, kk: (kk // steps_per_k_block, i, 0)))
        operands.append(jnp.pad(scale_a.T, ((0, 0), (0, m_pad - m)), constant_values=1.0)[:, :, None])
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        operands.append(jnp.pad(bias.astype(jnp.float32).reshape(1, n), ((0, 0), (0, n_pad - n))))

    scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
    if plan.cache_x:
        scratch += [pltpu.VMEM((grid[2], tm, tk), plan.mxu_dtype), pltpu.VMEM((grid[2], tm, 1), jnp.float32)]

    kernel = functools.partial(
        _block_gemm_kernel,
        quantize=quantize,
        cache_x=plan.cache_x,
        has_bias=bias is not None,
        k_blocks=scale_b.shape[1],
        steps_per_k_block=steps_per_k_block,
        tiles_per_n_block=bn // tn,
        group=bk,
        fp8_dtype=fp8_dtype,
        mxu_dtype=plan.mxu_dtype,
    )
    mode = "quant" if quantize else "codes"
    with jax.named_scope(f"w8a8_block_scaled_mm_{mode}_{blocks}_b{bn}x{bk}_{np.dtype(plan.mxu_dtype).name}"):
        out = pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
            out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
            scratch_shapes=scratch,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary" if plan.cache_x else "parallel", "arbitrary"),
                vmem_limit_bytes=plan.vmem_limit,
            ),
            interpret=interpret,
        )(*operands)
    return out[:m, :n]


def plan_block_gemm(
    m: int,
    k: int,
    n: int,
    block_size: tuple[int, int],
    *,
    x_dtype,
    fp8_dtype,
    out_dtype,
    quantize: bool,
    blocks: BlockSizes | None = None,
    generation: str | None = None,
) -> BlockGemmPlan:
    """The tiles (given, or `tuned_block_sizes.default_block_gemm_sizes` fitted to VMEM), checked
    against the tiling rules; whether to cache the quantized row block; the VMEM limit.

    Raises ValueError naming the values where the rules do not hold: tiles that break the TPU
    tiling (`tile_m % 32`, `tile_n % 128`, `tile_k % 128`), tile_k not dividing bk (not equal to bk
    when `quantize`), tile_n not dividing bn, bn or bk not a multiple of 128 (no tile can divide
    it), weight scales over the SMEM budget, blocks over the VMEM budget.
    """
    gen = hardware.resolve(generation)
    block_size = scheme_lib.check_block_size(block_size)
    smem = tuned_block_sizes.block_scales_smem_bytes(n, k, block_size)
    if smem > tuned_block_sizes.smem_budget(gen):
        shape = (layout.num_blocks(n, block_size[0]), layout.num_blocks(k, block_size[1]))
        raise ValueError(
            f"the weight scales {shape} need {smem} bytes of SMEM, over the {tuned_block_sizes.smem_budget(gen)} "
            f"byte budget on TPU {gen.name} (N={n}, K={k}, block_size {block_size})"
        )
    mxu = hardware.mxu_dtype(gen, fp8_dtype)
    vmem_args = {"x_dtype": x_dtype, "mxu_dtype": mxu, "out_dtype": out_dtype}
    if blocks is None:
        blocks = tuned_block_sizes.default_block_gemm_sizes(gen, m, n, block_size, quantize_in_kernel=quantize)
        blocks = tuned_block_sizes.fit_block_vmem(blocks, gen, block_size, quantize_in_kernel=quantize, **vmem_args)
    elif not isinstance(blocks, BlockSizes):
        raise TypeError(f"blocks must be a BlockSizes or None, got {type(blocks).__name__}")
    tuned_block_sizes.check_block_tiling(blocks, block_size, quantize_in_kernel=quantize)
    estimate = tuned_block_sizes.block_gemm_vmem_bytes(blocks, quantize_in_kernel=quantize, **vmem_args)
    cache_x = False
    if quantize and layout.round_up(n, blocks.tile_n) > blocks.tile_n:  # more than one N block to reuse it
        k_steps = layout.round_up(k, blocks.tile_k) // blocks.tile_k
        cached = tuned_block_sizes.block_gemm_vmem_bytes(
            blocks, quantize_in_kernel=True, cached_k_steps=k_steps, **vmem_args
        )
        if cached <= tuned_block_sizes.vmem_budget(gen):
            cache_x, estimate = True, cached
    what = f"the block fp8 GEMM with blocks {blocks} (M={m}, K={k}, N={n}, block_size {block_size})"
    tuned_block_sizes.check_vmem(estimate, gen, what)
    return BlockGemmPlan(blocks, mxu, cache_x, tuned_block_sizes.vmem_limit(estimate, gen))


def w8a8_block_scaled_mm(
    qinput: jax.Array,
    weight: jax.Array,
    scale_a: jax.Array,
    scale_b: jax.Array,
    block_size,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    blocks: BlockSizes | None = None,
    generation: str | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> jax.Array:
    """The block-scaled fp8 GEMM on TPU: the module docstring's sum, in `out_dtype`.

    Args:
      qinput: `(M, K)` fp8 codes, quantized per token in groups of bk.
      weight: `(N, K)` fp8, same dtype as qinput; contracted on K.
      scale_a: `(M, ceil(K / bk))` float32, one per token and k-block.
      scale_b: `(ceil(N / bn), ceil(K / bk))` float32, one per weight block.
      block_size: `(bn, bk)`; both multiples of 128.
      bias: `(N,)` bf16/f16/f32 or None.
      out_dtype: bfloat16, float16 or float32.
      blocks: tiles (tile_n dividing bn, tile_k dividing bk); None takes the rule of
        `tuned_block_sizes.default_block_gemm_sizes`.
      generation: "v4", "v5e", "v5p", "v6e" or "v7" (MXU dtype, VMEM budget); None: the default
        device's (`hardware.INTERPRET_GENERATION` off TPU).
      interpret: `pltpu.InterpretParams()` runs the kernel in TPU interpret mode (e.g. on CPU).

    Returns:
      `(M, N)` out_dtype.
    """
    scale_a, scale_b, block_size, bias, out_dtype = block_lib.check_block_gemm_operands(
        qinput, weight, scale_a, scale_b, block_size, bias, out_dtype
    )
    (m, k), n = qinput.shape, weight.shape[0]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    fp8_dtype = np.dtype(qinput.dtype)
    plan = plan_block_gemm(
        m,
        k,
        n,
        block_size,
        x_dtype=fp8_dtype,
        fp8_dtype=fp8_dtype,
        out_dtype=out_dtype,
        quantize=False,
        blocks=blocks,
        generation=generation,
    )
    return _block_gemm(
        qinput,
        weight,
        scale_a,
        scale_b,
        bias,
        block_size=block_size,
        plan=plan,
        out_dtype=out_dtype,
        fp8_dtype=fp8_dtype,
        interpret=interpret,
    )


def fused_quant_block_scaled_mm(
    x: jax.Array,
    weight: jax.Array,
    weight_scale: jax.Array,
    block_size,
    bias: jax.Array | None = None,
    out_dtype=None,
    *,
    blocks: BlockSizes | None = None,
    generation: str | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> jax.Array:
    """Quantize `x` per token in groups of bk to `weight`'s fp8 dtype inside the block GEMM kernel.

    Returns `w8a8_block_scaled_mm(q, weight, s, weight_scale, block_size, bias, out_dtype)` where
    `q, s = quantization.quantize_per_token_group(x, bk, weight.dtype)` bit for bit (the kernel
    calls that formula on each `(tile_m, bk)` group tile).

    Args:
      x: `(M, K)` bfloat16, float16 or float32.
      weight: `(N, K)` fp8.
      weight_scale: `(ceil(N / bn), ceil(K / bk))` float32.
      block_size: `(bn, bk)`; both multiples of 128.
      bias: `(N,)` or None.
      out_dtype: bf16, f16 or f32; default x's dtype.
      blocks, generation, interpret: as in `w8a8_block_scaled_mm`; `blocks.tile_k` must equal bk.
    """
    validation.check_float_input("x", x, ndim=2)
    validation.check_fp8("weight", weight)
    (m, k), (n, weight_k) = x.shape, weight.shape
    if weight_k != k:
        raise ValueError(f"weight must be (N, K) with K={k} (x's last dim), got shape {tuple(weight.shape)}")
    block_size = scheme_lib.check_block_size(block_size)
    # The weight side checked by the codes path's checks; the activation's codes and group scales
    # are made in the kernel, so they stand in as placeholders of their shapes.
    placeholder_codes = jax.ShapeDtypeStruct((m, k), weight.dtype)
    unit_scales = jnp.ones((m, layout.num_blocks(k, block_size[1])), jnp.float32)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _, weight_scale, block_size, bias, out_dtype = block_lib.check_block_gemm_operands(
        placeholder_codes, weight, unit_scales, weight_scale, block_size, bias, out_dtype
    )
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    fp8_dtype = np.dtype(weight.dtype)
    plan = plan_block_gemm(
        m,
        k,
        n,
        block_size,
        x_dtype=x.dtype,
        fp8_dtype=fp8_dtype,
        out_dtype=out_dtype,
        quantize=True,
        blocks=blocks,
        generation=generation,
    )
    return _block_gemm(
        x,
        weight,
        None,
        weight_scale,
        bias,
        block_size=block_size,
        plan=plan,
        out_dtype=out_dtype,
        fp8_dtype=fp8_dtype,
        interpret=interpret,
    )


def _plannable(m, k, n, block_size, **plan_args) -> bool:
    try:
        plan_block_gemm(m, k, n, block_size, **plan_args)
    except ValueError:
        return False
    return True


def block_scaled_mm_supports(m, k, n, block_size, fp8_dtype, *, generation: str | None = None) -> bool:
    """Whether `w8a8_block_scaled_mm` takes `(M, K) x (N, K)` with `block_size` at its default
    tiles: M, K, N >= 1, bn and bk multiples of 128, the weight scales within the SMEM budget and
    the tiles within the VMEM budget (estimated for float32 output, the largest, so any out_dtype
    runs). The same planner as the call itself answers, so True means the call plans."""
    if min(m, k, n) < 1 or not dtypes.is_fp8(fp8_dtype):
        return False
    return _plannable(
        m,
        k,
        n,
        block_size,
        x_dtype=fp8_dtype,
        fp8_dtype=fp8_dtype,
        out_dtype=np.dtype(jnp.float32),
        quantize=False,
        generation=generation,
    )


def quant_block_scaled_mm_supports(
    m, k, n, block_size, input_dtype, fp8_dtype, out_dtype, *, generation: str | None = None
) -> bool:
    """Whether `fused_quant_block_scaled_mm` takes the shape and dtypes at its default tiles: as
    `block_scaled_mm_supports`, with tile_k = bk (one whole group per k-step) and the float input
    tiles, for a bf16/f16/f32 input and output."""
    if min(m, k, n) < 1 or not dtypes.is_fp8(fp8_dtype):
        return False
    if np.dtype(input_dtype) not in dtypes.FLOAT_DTYPES or np.dtype(out_dtype) not in dtypes.FLOAT_DTYPES:
        return False
    return _plannable(
        m,
        k,
        n,
        block_size,
        x_dtype=np.dtype(input_dtype),
        fp8_dtype=fp8_dtype,
        out_dtype=np.dtype(out_dtype),
        quantize=True,
        generation=generation,
    )
