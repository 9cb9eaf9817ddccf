"""Pallas TPU kernel: rowwise-scaled fp8 GEMM, optionally quantizing the activation in-kernel.

Computes `out = (scale_a * scale_b) * (q_a @ weight.T) + bias`, accumulated in float32 and rounded
once to `out_dtype`:
  grid (M / tile_m, N / tile_n, K / tile_k), K last and sequential ("arbitrary");
  weight `(N, K)` contracted on K of both operands (no transpose in HBM);
  a float32 VMEM accumulator, zeroed at k = 0;
  scales `(1,)` (SMEM scalar) or `(M, 1)` / `(N, 1)` (VMEM blocks) and bias applied once, in the
  epilogue of the last k step.
MXU operands are the fp8 codes on v7 and bfloat16 elsewhere (exact upcast in VMEM; HBM traffic
stays fp8); see `hardware.mxu_dtype`.

The activation arrives in one of three forms (`x_mode`):
  "codes":     fp8 codes with their scale `(1,)` or `(M, 1)`;
  "static":    float rows and a static `(1,)` input scale; each tile is quantized in-kernel as
               `fp8(clamp(x * (1 / s)))`, any K;
  "per_token": float rows; each row's amax, scale and codes are computed in-kernel with
               `quantization.quantize_per_token`. Needs the whole row in one block (K = tile_k).
When the activation is quantized in-kernel and K fits one block, it is quantized once per row
block (at n = 0) into a VMEM scratch in the MXU dtype and reused for every N block; the N axis is
then sequential ("arbitrary") so that n = 0 runs first on the core that owns the row block.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from w8a8_jax import dtypes, layout, quantization, validation
from w8a8_jax.kernels.tpu import hardware, tuned_block_sizes
from w8a8_jax.kernels.tpu.tuned_block_sizes import BlockSizes

X_MODES = ("codes", "static", "per_token")


def _gemm_kernel(
    *refs,
    x_mode: str,
    a_per_tensor: bool,
    b_per_tensor: bool,
    has_ub: bool,
    has_bias: bool,
    cache_x: bool,
    fp8_dtype,
    mxu_dtype,
):
    refs = list(refs)
    # Scalar operands first (SMEM), then blocks (VMEM), then outputs and scratch; see `_gemm`.
    scale_a_smem = refs.pop(0) if x_mode == "static" or (x_mode == "codes" and a_per_tensor) else None
    inverse_scale_a_smem = refs.pop(0) if x_mode == "static" else None
    scale_ub_smem = refs.pop(0) if has_ub else None
    scale_b_smem = refs.pop(0) if b_per_tensor else None
    x_vmem = refs.pop(0)  # (tm, tk) fp8 codes, or float when quantized here
    w_vmem = refs.pop(0)  # (tn, tk) fp8
    scale_a_vmem = refs.pop(0) if x_mode == "codes" and not a_per_tensor else None  # (tm, 1) f32
    scale_b_vmem = refs.pop(0) if not b_per_tensor else None  # (1, tn) f32
    bias_vmem = refs.pop(0) if has_bias else None  # (1, tn) f32
    out_vmem = refs.pop(0)  # (tm, tn) out_dtype
    acc_vmem = refs.pop(0)  # (tm, tn) f32
    xq_vmem = refs.pop(0) if cache_x else None  # (tm, tk) mxu_dtype, the quantized row block
    row_scale_vmem = refs.pop(0) if x_mode == "per_token" else None  # (tm, 1) f32
    assert not refs

    n_idx, k_idx = pl.program_id(1), pl.program_id(2)

    def quantize_x():
        x = x_vmem[...]
        if x_mode == "static":
            # quantize_per_tensor's formula with the reciprocal taken once in XLA by the wrapper.
            bound = dtypes.fp8_max(fp8_dtype)
            return jnp.clip(x.astype(jnp.float32) * inverse_scale_a_smem[0], -bound, bound).astype(fp8_dtype)
        q, row_scale = quantization.quantize_per_token(
            x, None if scale_ub_smem is None else scale_ub_smem[0], fp8_dtype
        )
        row_scale_vmem[...] = row_scale
        return q

    if x_mode == "codes":
        x_mxu = x_vmem[...].astype(mxu_dtype)
    elif cache_x:

        @pl.when(n_idx == 0)
        def _quantize_once():
            xq_vmem[...] = quantize_x().astype(mxu_dtype)

        x_mxu = xq_vmem[...]
    else:
        x_mxu = quantize_x().astype(mxu_dtype)

    @pl.when(k_idx == 0)
    def _zero():
        acc_vmem[...] = jnp.zeros_like(acc_vmem)

    acc_vmem[...] += jax.lax.dot_general(
        x_mxu, w_vmem[...].astype(mxu_dtype), layout.CONTRACT_K, preferred_element_type=jnp.float32
    )

    @pl.when(k_idx == pl.num_programs(2) - 1)
    def _epilogue():
        acc = acc_vmem[...]
        if row_scale_vmem is not None:
            scale_a = row_scale_vmem[...]
        elif scale_a_vmem is not None:
            scale_a = scale_a_vmem[...]
        else:
            scale_a = scale_a_smem[0]
        scale_b = scale_b_smem[0] if b_per_tensor else scale_b_vmem[...]
        # The same products, in the same order, as the XLA paths' epilogue (`scaled_mm.apply_scales`).
        if np.ndim(scale_a) == 0 and b_per_tensor:
            out = acc * (scale_a * scale_b)
        else:
            out = acc * scale_a * scale_b
        if bias_vmem is not None:
            out = out + bias_vmem[...]
        out_vmem[...] = out.astype(out_vmem.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("x_mode", "blocks", "out_dtype", "fp8_dtype", "mxu_dtype", "vmem_limit", "interpret"),
)
def _gemm(
    x,
    weight,
    scale_a,
    scale_b,
    bias,
    scale_ub,
    *,
    x_mode,
    blocks,
    out_dtype,
    fp8_dtype,
    mxu_dtype,
    vmem_limit,
    interpret,
):
    """Pads to block multiples, runs the kernel, slices. Scales arrive as (1,) or (M, 1) / (1, N)."""
    (m, k), n = x.shape, weight.shape[0]
    tm, tn, tk = blocks.tile_m, blocks.tile_n, blocks.tile_k
    m_pad, n_pad, k_pad = (layout.round_up(v, t) for v, t in ((m, tm), (n, tn), (k, tk)))
    grid = (m_pad // tm, n_pad // tn, k_pad // tk)
    a_per_tensor = scale_a is None or scale_a.size == 1
    b_per_tensor = scale_b.size == 1
    cache_x = x_mode != "codes" and grid[2] == 1
    if x_mode == "per_token" and grid[2] != 1:
        raise ValueError(f"in-kernel per-token quant needs K in one block: K={k} > {tk=}")

    # Zero padding: padded K adds 0 * 0 to the sums and leaves each row's amax unchanged; padded
    # rows quantize to zero codes with the floor scale; scales pad with 1; padded outputs are sliced.
    x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
    weight = jnp.pad(weight, ((0, n_pad - n), (0, k_pad - k)))

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    scalar_specs, scalars, block_specs, blocks_in = [], [], [], []
    if x_mode == "static" or (x_mode == "codes" and a_per_tensor):
        scalar_specs.append(smem)
        scalars.append(scale_a.reshape(1))
    if x_mode == "static":
        scalar_specs.append(smem)
        scalars.append(1.0 / scale_a.reshape(1))  # as quantize_per_tensor: reciprocal in float32
    if scale_ub is not None:
        scalar_specs.append(smem)
        scalars.append(scale_ub.reshape(1))
    if b_per_tensor:
        scalar_specs.append(smem)
        scalars.append(scale_b.reshape(1))
    block_specs += [
        pl.BlockSpec((tm, tk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((tn, tk), lambda i, j, kk: (j, kk)),
    ]
    blocks_in += [x, weight]
    if x_mode == "codes" and not a_per_tensor:
        block_specs.append(pl.BlockSpec((tm, 1), lambda i, j, kk: (i, 0)))
        blocks_in.append(jnp.pad(scale_a.reshape(m, 1), ((0, m_pad - m), (0, 0)), constant_values=1.0))
    if not b_per_tensor:
        block_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        blocks_in.append(jnp.pad(scale_b.reshape(1, n), ((0, 0), (0, n_pad - n)), constant_values=1.0))
    if bias is not None:
        block_specs.append(pl.BlockSpec((1, tn), lambda i, j, kk: (0, j)))
        blocks_in.append(jnp.pad(bias.astype(jnp.float32).reshape(1, n), ((0, 0), (0, n_pad - n))))

    scratch = [pltpu.VMEM((tm, tn), jnp.float32)]
    if cache_x:
        scratch.append(pltpu.VMEM((tm, tk), mxu_dtype))
    if x_mode == "per_token":
        scratch.append(pltpu.VMEM((tm, 1), jnp.float32))

    kernel = functools.partial(
        _gemm_kernel,
        x_mode=x_mode,
        a_per_tensor=a_per_tensor,
        b_per_tensor=b_per_tensor,
        has_ub=scale_ub is not None,
        has_bias=bias is not None,
        cache_x=cache_x,
        fp8_dtype=fp8_dtype,
        mxu_dtype=mxu_dtype,
    )
    with jax.named_scope(f"w8a8_scaled_mm_{x_mode}_{blocks}_{np.dtype(mxu_dtype).name}"):
        out = pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=scalar_specs + block_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
            out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
            scratch_shapes=scratch,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary" if cache_x else "parallel", "arbitrary"),
                vmem_limit_bytes=vmem_limit,
            ),
            interpret=interpret,
        )(*scalars, *blocks_in)
    return out[:m, :n]


def _plan(gen, m, k, n, *, x_dtype, fp8_dtype, out_dtype, x_mode, row_scales, blocks):
    """Block sizes (given, or from the table fitted to VMEM), checked; the MXU dtype; the VMEM limit."""
    mxu = hardware.mxu_dtype(gen, fp8_dtype)
    vmem_args = {
        "x_dtype": x_dtype,
        "mxu_dtype": mxu,
        "out_dtype": out_dtype,
        "quantize_in_kernel": x_mode != "codes",
        "row_scales": row_scales,
    }
    if blocks is None:
        blocks = tuned_block_sizes.get_block_sizes(gen, m, k, n)
        if x_mode == "per_token":  # the whole row in one block
            blocks = dataclasses.replace(blocks, tile_k=layout.round_up(k, tuned_block_sizes.LANES))
        blocks = tuned_block_sizes.fit_vmem(blocks, gen, k=k, n=n, shrink_k=x_mode != "per_token", **vmem_args)
    tuned_block_sizes.check_tiling(blocks)
    estimate = tuned_block_sizes.gemm_vmem_bytes(blocks, **vmem_args)
    tuned_block_sizes.check_vmem(estimate, gen, f"the fp8 GEMM with blocks {blocks} (M={m}, K={k}, N={n})")
    return blocks, mxu, tuned_block_sizes.vmem_limit(estimate, gen)


def _check_blocks_arg(blocks):
    if blocks is not None and not isinstance(blocks, BlockSizes):
        raise TypeError(f"blocks must be a BlockSizes or None, got {type(blocks).__name__}")


def _weight_scale_row(scale: jax.Array) -> jax.Array:
    """A weight scale as the kernel takes it: `(1,)` per-tensor, `(1, N)` per-channel."""
    return scale.reshape(1) if validation.is_per_tensor(scale) else scale.reshape(1, -1)


def w8a8_scaled_mm(
    qinput: jax.Array,
    weight: jax.Array,
    scale_a: jax.Array,
    scale_b: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    blocks: BlockSizes | None = None,
    generation: str | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> jax.Array:
    """The fused fp8 GEMM on TPU: `(scale_a * scale_b * (qinput @ weight.T) + bias)` in `out_dtype`,
    accumulated in float32, scales and bias applied once in the last-k epilogue.

    Args:
      qinput: `(M, K)` fp8 codes.
      weight: `(N, K)` fp8, same dtype as qinput; contracted on K.
      scale_a: float32 `(1,)` per-tensor (also `()`, `(1, 1)`) or `(M, 1)` per-token (also `(M,)`).
      scale_b: float32 `(1,)` per-tensor or `(N, 1)` per-channel (also `(N,)`).
      bias: `(N,)` bf16/f16/f32 or None.
      out_dtype: bfloat16, float16 or float32.
      blocks: block sizes; None takes them from `tuned_block_sizes` for the generation and shape.
      generation: "v4", "v5e", "v5p", "v6e" or "v7": picks the MXU dtype (fp8 on v7, bf16
        upcast elsewhere), the block table and the VMEM budget. None: the default device's
        (`hardware.INTERPRET_GENERATION` off TPU).
      interpret: `pltpu.InterpretParams()` runs the kernel in TPU interpret mode (e.g. on CPU).

    Returns:
      `(M, N)` out_dtype.
    """
    scale_a, scale_b, bias, out_dtype = validation.check_gemm_operands(
        qinput, weight, scale_a, scale_b, bias, out_dtype
    )
    _check_blocks_arg(blocks)
    gen = hardware.resolve(generation)
    (m, k), n = qinput.shape, weight.shape[0]
    row_scales = not validation.is_per_tensor(scale_a)
    blocks, mxu, limit = _plan(
        gen,
        m,
        k,
        n,
        x_dtype=qinput.dtype,
        fp8_dtype=qinput.dtype,
        out_dtype=out_dtype,
        x_mode="codes",
        row_scales=row_scales,
        blocks=blocks,
    )
    scale_a = scale_a.reshape(-1, 1) if row_scales else scale_a.reshape(1)
    scale_b = _weight_scale_row(scale_b)
    return _gemm(
        qinput,
        weight,
        scale_a,
        scale_b,
        bias,
        None,
        x_mode="codes",
        blocks=blocks,
        out_dtype=out_dtype,
        fp8_dtype=np.dtype(qinput.dtype),
        mxu_dtype=mxu,
        vmem_limit=limit,
        interpret=interpret,
    )


def fused_quant_scaled_mm(
    x: jax.Array,
    weight: jax.Array,
    weight_scale: jax.Array,
    *,
    input_scale: jax.Array | None = None,
    scale_ub: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=None,
    blocks: BlockSizes | None = None,
    generation: str | None = None,
    interpret: pltpu.InterpretParams | bool | None = None,
) -> jax.Array:
    """Quantize `x` to `weight`'s fp8 dtype and run the scaled GEMM, the quantization inside the kernel.

    Returns `s_x * weight_scale * (q(x) @ weight.T) + bias` in `out_dtype`, where `q(x), s_x` are
    exactly `scaled_fp8_quant`'s codes and scales:
      input_scale given (static): `q = fp8(clamp(x * (1 / input_scale)))`, quantized tile by tile
        in the kernel for any K;
      input_scale None (dynamic per token): `quantize_per_token(x, scale_ub)`, in the kernel, which
        needs the whole row in one block (`per_token_fits`; quantized once per row block, reused
        across N blocks); where it does not fit, run `quant.per_token_quant` then `w8a8_scaled_mm`.
    Dynamic per-tensor scales need a global amax before any block runs: use `scaled_fp8_quant`
    and `w8a8_scaled_mm` for those.

    Args:
      x: `(M, K)` bfloat16, float16 or float32.
      weight: `(N, K)` fp8.
      weight_scale: float32 `(1,)` or `(N, 1)`.
      input_scale: static `(1,)` float32 activation scale, or None for dynamic per-token.
      scale_ub: `(1,)` upper bound on each row's amax (dynamic per-token only).
      bias: `(N,)` or None.
      out_dtype: bf16, f16 or f32; default x's dtype.
      blocks, generation, interpret: as in `w8a8_scaled_mm`; `blocks.tile_k` must cover K for
        in-kernel per-token quant.
    """
    validation.check_float_input("x", x, ndim=2)
    validation.check_fp8("weight", weight)
    (m, k), (n, weight_k) = x.shape, weight.shape
    if weight_k != k:
        raise ValueError(f"weight must be (N, K) with K={k} (x's last dim), got shape {tuple(weight.shape)}")
    out_dtype = validation.check_out_dtype(x.dtype if out_dtype is None else out_dtype)
    fp8_dtype = np.dtype(weight.dtype)
    _check_blocks_arg(blocks)
    if input_scale is not None:
        if scale_ub is not None:
            raise ValueError("scale_ub applies only to dynamic per-token quantization (input_scale=None)")
        input_scale = validation.per_tensor_scale("input_scale", input_scale)
    elif scale_ub is not None:
        scale_ub = validation.per_tensor_scale("scale_ub", scale_ub)
    # Validate the weight side once, with the codes-path checks (dtype, shapes, scale values).
    weight_scale = validation.as_scale("weight_scale", weight_scale)
    validation.check_row_scale("weight_scale", weight_scale, n, "output channel")
    validation.check_scale_values("weight_scale", weight_scale)
    placeholder_codes = jax.ShapeDtypeStruct((m, k), fp8_dtype)
    _, weight_scale, bias, out_dtype = validation.check_gemm_operands(
        placeholder_codes, weight, jnp.ones((1,), jnp.float32), weight_scale, bias, out_dtype
    )
    gen = hardware.resolve(generation)
    x_mode = "static" if input_scale is not None else "per_token"
    if x_mode == "per_token":
        k_one_block = layout.round_up(k, tuned_block_sizes.LANES)
        fits = (
            blocks.tile_k >= k_one_block
            if blocks is not None
            else per_token_fits(m, k, n, x.dtype, fp8_dtype, out_dtype, generation=gen.name)
        )
        if not fits:
            raise ValueError(
                f"in-kernel per-token quantization needs the whole row (K={k}) in one block, which does not fit "
                f"{'tile_k=' + str(blocks.tile_k) if blocks is not None else 'VMEM'}: run per_token_quant, then "
                "w8a8_scaled_mm"
            )
        if blocks is not None:
            blocks = dataclasses.replace(blocks, tile_k=k_one_block)
    blocks, mxu, limit = _plan(
        gen,
        m,
        k,
        n,
        x_dtype=x.dtype,
        fp8_dtype=fp8_dtype,
        out_dtype=out_dtype,
        x_mode=x_mode,
        row_scales=x_mode == "per_token",
        blocks=blocks,
    )
    scale_b = _weight_scale_row(weight_scale)
    return _gemm(
        x,
        weight,
        input_scale,
        scale_b,
        bias,
        scale_ub,
        x_mode=x_mode,
        blocks=blocks,
        out_dtype=out_dtype,
        fp8_dtype=fp8_dtype,
        mxu_dtype=mxu,
        vmem_limit=limit,
        interpret=interpret,
    )


def per_token_fits(m, k, n, x_dtype, fp8_dtype, out_dtype, *, generation: str | None = None) -> bool:
    """Whether the whole row fits one block at the generation's chosen tile_m and tile_n, so that
    `fused_quant_scaled_mm` can quantize per token in-kernel."""
    gen = hardware.resolve(generation)
    blocks = tuned_block_sizes.get_block_sizes(gen, m, k, n)
    blocks = dataclasses.replace(blocks, tile_k=layout.round_up(k, tuned_block_sizes.LANES))
    estimate = tuned_block_sizes.gemm_vmem_bytes(
        blocks,
        x_dtype=x_dtype,
        mxu_dtype=hardware.mxu_dtype(gen, fp8_dtype),
        out_dtype=out_dtype,
        quantize_in_kernel=True,
        row_scales=True,
    )
    return estimate <= tuned_block_sizes.vmem_budget(gen)
