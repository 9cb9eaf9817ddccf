"""Rowwise-scaled fp8 GEMM for Hopper (sm90) in Pallas Mosaic GPU.

`scaled_mm` returns `(scale_a * scale_b) * (qinput @ weight.T) + bias` in `out_dtype`, with both
fp8 operands K-major (`qinput (M, K)`, `weight (N, K)`), a float32 accumulator, and the scales and
bias applied to the float32 accumulator before one rounding.

The schedule: a persistent grid over CTA output tiles (planar-snake rasterization for L2 reuse);
per CTA one TMA producer warpgroup and two `wgmma` consumer warpgroups around a multi-stage
shared-memory ring (128-byte swizzle); by default CTAs pair into clusters of 2 along M that share
each B tile by TMA multicast (halving its L2 reads), and one pipeline runs across all of a CTA's
tiles; the epilogue stages the `(M,)` and `(N,)` scale vectors and the bias in shared memory,
applies them to the accumulator in registers, casts, and stores through shared memory with TMA.
The plan sends rowwise GEMMs of decode-sized M (<= 64) to XLA, which measured faster there
(benchmarks/NOTES.md).

The same schedule runs the block-scaled GEMM (`block_scaled_mm.py`): each k-step's activation
scales then travel through the pipeline with the operands, and the promotion of each column chunk
(128 columns, or 64: `GemmConfig.promote_n`) multiplies it by its rows' scales times its weight
block's scale; the epilogue adds the bias.

Three variations of the schedule (`GemmConfig`); the first two are the default where the tiles
underfill the SMs (`tuned_block_sizes.default_config`), the third measured slower and is no default:
- split K (`k_splits`): a work unit is a CTA tile over one slice of K; the kernel writes each
  unit's float32 sum and one XLA fusion adds the slices, scales, adds the bias and casts (`gemm`);
- swapped operands (`swap_ab`, decode): the kernel computes `out.T`, the weight's rows on `wgmma`'s
  64-row side and the tokens on its narrow side, and XLA transposes the float32 result;
- overlapped promotion (`overlap_promotion`): each k-block's `wgmma` runs into one of two
  accumulators while the previous k-block's is promoted, so no promotion waits for the tensor cores
  to drain (`_overlapped_step`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from w8a8_jax import layout, platform, validation
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs
from w8a8_jax.kernels.gpu.tuned_block_sizes import GemmConfig

# K and N granularity of the kernel: one 128-byte swizzle row of fp8 along K; the CTA tile's 128
# rows along N. Other multiples of SHAPE_MULTIPLE (TMA's 16-byte rows) are zero-padded up to them.
K_MULTIPLE = 128
N_MULTIPLE = tbs.N_MULTIPLE
SHAPE_MULTIPLE = 16
# TMA writes shared memory at 128-byte aligned addresses only: a pipelined slab of a stage spans a
# multiple of this many float32 scales, else every other stage's copy faults (misaligned address).
TMA_SMEM_FLOATS = 128 // 4
# The weight-block scales a stage carries (`pipelined_weight_scales`): a slab from the CTA's first
# block rounded down to a multiple of TMA_SMEM_FLOATS, so its global start is 128-byte aligned too
# (copies from 4-byte aligned starts stopped the kernel with an illegal instruction on the H200),
# and long enough to hold the CTA's blocks past that start.
WEIGHT_SLAB_FLOATS = 2 * TMA_SMEM_FLOATS


def _interpret_params():
    return plgpu.InterpretGPUParams()


def supports_shape(k: int, n: int) -> bool:
    """Whether the kernel takes contraction `k` and output width `n` (else the XLA paths run)."""
    return k % SHAPE_MULTIPLE == 0 and n % SHAPE_MULTIPLE == 0 and k > 0 and n > 0


def _fp8_transforms(tile_k: int):
    swizzle = plgpu.find_swizzle(tile_k * 8)  # fp8: 8 bits an element
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def _out_transforms(epi_tile_n: int, out_dtype):
    itemsize = jnp.dtype(out_dtype).itemsize
    swizzle = plgpu.find_swizzle(epi_tile_n * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def out_tile_columns(config: GemmConfig, out_dtype) -> int:
    """The columns of the epilogue's swizzled TMA store tile: an output whose N divides by them may
    end inside the last CTA tile (its columns past N are dropped); any other N is padded."""
    dtype = jnp.float32 if config.raw_out else out_dtype
    return _out_transforms(config.epi_tile_n, dtype)[0].tiling[1]


def _token_slab(config: GemmConfig) -> int:
    """Swapped block scales: the token scales a stage carries, the CTA's `cta_n` and the next ones'
    up to TMA's alignment (`gemm` pads the array's columns for the last CTA's)."""
    return layout.round_up(config.cta_n, TMA_SMEM_FLOATS)


def _pipelined_weight_scales(scale_b: jax.Array) -> jax.Array:
    """`(NB, KB)` weight-block scales as the pipeline reads them (`pipelined_weight_scales`):
    k-block-major, `(KB, width)`, with ones past the NB blocks so that the last CTA's slab
    (`WEIGHT_SLAB_FLOATS` from its first block rounded down to `TMA_SMEM_FLOATS`) stays in bounds."""
    blocks = scale_b.shape[0]
    width = layout.round_up(blocks, TMA_SMEM_FLOATS) + WEIGHT_SLAB_FLOATS - TMA_SMEM_FLOATS
    return jnp.pad(scale_b.T, ((0, 0), (0, width - blocks)), constant_values=1.0)


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _promoted_zeros(rows: int, cols: int, chunk: int):
    """A promoting warpgroup's float32 totals: one `(rows, chunk)` array per column chunk."""
    return tuple(_zeros((rows, chunk)) for _ in range(cols // chunk))


def _mma_step(carry, a, b_nk, promote: bool, scales=None):
    """One k-block of `wgmma`; with `promote`, its sum is added into float32 register totals.

    Hopper's fp8 `wgmma` accumulates with fewer bits than float32 (measured: relative error 7e-3
    at K=14336 against 2e-5 for float32 accumulation), so each k-block (tile_k = 128: four
    instructions per chunk) runs into a fresh zeroed accumulator and is promoted with float32
    adds, one column chunk of the totals (`_promoted_zeros`) at a time, so the `wgmma`
    accumulator is never wider than a chunk. fp8 `wgmma` takes K-major operands only: `b_nk` is
    the `(N, K)` tile, seen as `(K, N)`.

    `scales` (block scaling): per column chunk a `(vector, dim)` pair, a float32 `(rows,)` vector
    in the accumulator's row layout (dim 0) or a `(chunk,)` one in its column layout (dim 1); each
    chunk's k-block sum is multiplied by it, broadcast along the other dimension, as it is promoted.
    """
    if not promote:
        if scales is not None:
            raise ValueError("block scales apply at promotion: they need promote=True")
        plgpu.wgmma(carry, a, b_nk.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return carry

    def block(acc_ref, b_kn):
        plgpu.wgmma(acc_ref, a, b_kn)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    chunk = carry[0].shape[1]

    def promoted(i, total):
        acc = pl.run_scoped(
            functools.partial(block, b_kn=b_nk.at[pl.ds(i * chunk, chunk)].transpose((1, 0))),
            plgpu.ACC(total.shape, jnp.float32),
        )
        if scales is not None:
            vector, dim = scales[i]
            acc = acc * lax.broadcast_in_dim(vector, acc.shape, [dim])
        return total + acc

    return tuple(promoted(i, total) for i, total in enumerate(carry))


def _zero_accumulator(acc_ref, interpret: bool) -> None:
    """Zeroes a `wgmma` accumulator for reuse. The interpreter has no accumulator store (it holds
    accumulators as plain buffers): there the zeros are a plain ref write."""
    zeros = _zeros(acc_ref.shape)
    if interpret:
        jax.ref.set(acc_ref, (), zeros)
    else:
        acc_ref[...] = zeros


def _overlapped_step(carry, k_step, accs, a, b_nk, scale, scale_dim: int, interpret: bool):
    """One k-block of `wgmma` with the previous k-block's promotion under it (`overlap_promotion`).

    `accs` are two accumulators used in turn (k-step parity): this step issues its `wgmma` into
    one, waits for all but it (`wgmma_wait(1)`), adds the other (the previous step's) into the
    float32 total, times that step's block scales, and zeroes it for the step after.
    `carry = (total, in_flight_scale)`: the `(rows, <= PROMOTE_N)` total and the previous step's
    scales (None: rowwise), a `(rows,)` vector (`scale_dim` 0) or a `(cols,)` one (1), as
    `_mma_step`'s. `_finish_overlapped` promotes the last k-block.
    """
    total, in_flight_scale = carry

    def issue_and_promote(acc, in_flight):
        plgpu.wgmma(acc, a, b_nk.transpose((1, 0)))
        done = plgpu.wgmma_accumulator_load(in_flight, wait_n=1)
        if in_flight_scale is not None:
            done = done * lax.broadcast_in_dim(in_flight_scale, done.shape, [scale_dim])
        _zero_accumulator(in_flight, interpret)
        return total + done

    first, second = accs
    total = lax.cond(
        lax.rem(k_step, 2) == 0,
        lambda: issue_and_promote(first, second),
        lambda: issue_and_promote(second, first),
    )
    return total, scale


def _finish_overlapped(carry, k_steps: int, accs, scale_dim: int):
    """The total of an overlapped k-loop's final carry: its last k-block promoted."""
    total, scale = carry
    done = plgpu.wgmma_accumulator_load(accs[(k_steps - 1) % 2], wait_n=0)
    if scale is not None:
        done = done * lax.broadcast_in_dim(scale, done.shape, [scale_dim])
    return total + done


def _gemm_kernel(
    a_gmem,  # (Mp, K) fp8; swap_ab: the weight
    b_gmem,  # (N, K) fp8; swap_ab: the tokens
    # (Mp,) float32; block scales: the activation scales k-block-major, (K / 128, Mp / tile_m,
    # tile_m), swap_ab (K / 128, N + _token_slab - cta_n)
    scale_a_gmem,
    # (N,) float32; block scales: the weight's, (weight rows / 128, K / 128), or with
    # pipelined_weight_scales transposed, (K / 128, weight rows / 128 + padding: `gemm`)
    scale_b_gmem,
    bias_gmem,  # (N,) float32 or None
    out_gmem,  # (Mp, N) out_dtype; raw_out: (k_splits * Mp, N) float32, a sum per K slice
    *,
    config: GemmConfig,
    block_scales: bool,
    interpret: bool,
):
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    out_dtype = out_gmem.dtype
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    cta_m, cta_n = config.cta_m, config.cta_n
    epi_m, epi_n = config.epi_tile_m, config.epi_tile_n
    # A cluster of 2 CTAs side by side along M (N) shares each B (A) tile: TMA multicasts it. A
    # work unit is one CTA tile over one of the k_splits slices of K.
    splits = config.k_splits
    # N need not fill the last tile: TMA zero-fills the weight rows it reads past the end and drops
    # the output columns it would write there.
    m_iters, n_iters, k_iters = m // config.cluster_m, -(-n // config.cluster_n), k // splits // tile_k
    transforms = _fp8_transforms(tile_k)
    # Raw: the float32 sums go out as they are; XLA applies the rowwise scales and the bias.
    raw = config.raw_out
    has_bias = bias_gmem is not None and not raw
    shared = ("cluster",)
    # Promoted column chunks of a warpgroup's tile; block scales: the dimension they vary along
    # (the rows are the tokens, or swapped the columns).
    chunk = min(tile_n, config.promote_n)
    chunks = tile_n // chunk
    scale_dim = 1 if config.swap_ab else 0
    weight_slab = block_scales and config.pipelined_weight_scales

    # Overlapped promotion: a stage is read by its step's `wgmma` until the next step has waited.
    release = dict(delay_release=1) if config.overlap_promotion else {}
    in_specs = [
        plgpu.BlockSpec(
            (cta_m, tile_k),
            lambda ki: (0, ki),
            transforms=transforms,
            collective_axes=shared if config.cluster == "n" else (),
            **release,
        ),
        plgpu.BlockSpec(
            (cta_n, tile_k),
            lambda ki: (0, ki),
            transforms=transforms,
            collective_axes=shared if config.cluster == "m" else (),
            **release,
        ),
    ]
    if block_scales:
        # The k-block's activation scales of the CTA's rows (swapped: of its columns, the tokens)
        # travel with its operands: one contiguous slab of the k-block-major array per stage.
        if config.swap_ab:
            in_specs.append(plgpu.BlockSpec((1, _token_slab(config)), lambda ki: (ki, 0), **release))
        else:
            in_specs.append(plgpu.BlockSpec((1, cta_m // tile_m, tile_m), lambda ki: (ki, 0, 0), **release))
        if config.pipelined_weight_scales:
            # The k-block's weight-block scales of the CTA's blocks (and their neighbours', to fill
            # the aligned slab), from the transposed `(K / 128, weight blocks)` array.
            in_specs.append(plgpu.BlockSpec((1, WEIGHT_SLAB_FLOATS), lambda ki: (ki, 0), **release))

    def get_pipeline(body, compute_context, pipeline_state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=config.stages,
            compute_context=compute_context,
            pipeline_state=pipeline_state,
        )

    def ignore(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(
            a_gmem, b_gmem, *([scale_a_gmem] if block_scales else []), *([scale_b_gmem] if weight_slab else [])
        ),
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_dtype, transforms=_out_transforms(epi_n, out_dtype)),
        scale_a_smem=None if block_scales or raw else plgpu.SMEM((2, tile_m), jnp.float32),
        scale_b_smem=None if block_scales or raw else plgpu.SMEM((2, tile_n), jnp.float32),
        bias_smem=plgpu.SMEM((2, tile_n), jnp.float32) if has_bias else None,
        vector_barriers=plgpu.Barrier(num_barriers=6),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, scale_a_smem, scale_b_smem, bias_smem, vector_barriers):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters * splits,), collective_axes="sm")
        def _tile_loop(loop_info):
            (unit,) = loop_info.index
            split, tile_idx = lax.div(unit, m_iters * n_iters), lax.rem(unit, m_iters * n_iters)
            k_slice = pl.ds(split * (k_iters * tile_k), k_iters * tile_k)
            m_idx, n_idx = plgpu.planar_snake(
                tile_idx, (m_iters, n_iters), 1 if config.grid_minor == "n" else 0, config.grid_tile_width
            )
            if config.cluster == "m":
                m_idx = 2 * m_idx + lax.axis_index("cluster")
            elif config.cluster == "n":
                n_idx = 2 * n_idx + lax.axis_index("cluster")
            cta_m_slice = pl.ds(m_idx * cta_m, cta_m)
            # The first weight block of the CTA's weight rows (its A rows when swapped).
            cta_first_block = (m_idx * cta_m if config.swap_ab else n_idx * cta_n) // tbs.PROMOTE_N
            weight_slab_start = cta_first_block // TMA_SMEM_FLOATS * TMA_SMEM_FLOATS
            cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
            out_m_slice = pl.ds(split * m + m_idx * cta_m, cta_m)  # the slice's rows of the sums
            if config.wg_split == "m":
                wg_m0, wg_n0 = m_idx * cta_m + wg * tile_m, n_idx * cta_n
                wg_m_slice, wg_n_slice = pl.ds(wg * tile_m, tile_m), slice(None)
            else:
                wg_m0, wg_n0 = m_idx * cta_m, n_idx * cta_n + wg * tile_n
                wg_m_slice, wg_n_slice = slice(None), pl.ds(wg * tile_n, tile_n)

            accs = []  # overlap_promotion: the two accumulators `compute_context` allocates for `mma_body`

            def compute_context(eval_pipeline):
                # The epilogue vectors travel while the k-loop runs (block scales apply in the loop).
                if not (block_scales or raw):
                    plgpu.copy_gmem_to_smem(
                        scale_a_gmem.at[pl.ds(wg_m0, tile_m)], scale_a_smem.at[wg], vector_barriers.at[3 * wg]
                    )
                    plgpu.copy_gmem_to_smem(
                        scale_b_gmem.at[pl.ds(wg_n0, tile_n)], scale_b_smem.at[wg], vector_barriers.at[3 * wg + 1]
                    )
                if has_bias:
                    plgpu.copy_gmem_to_smem(
                        bias_gmem.at[pl.ds(wg_n0, tile_n)], bias_smem.at[wg], vector_barriers.at[3 * wg + 2]
                    )

                def epilogue(totals):  # column chunks of the (tile_m, tile_n) float32 total, WGMMA layout
                    rowwise = not (block_scales or raw)
                    if rowwise:
                        plgpu.barrier_wait(vector_barriers.at[3 * wg])
                        plgpu.barrier_wait(vector_barriers.at[3 * wg + 1])
                        row_scale = plgpu.load(scale_a_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                    if has_bias:
                        plgpu.barrier_wait(vector_barriers.at[3 * wg + 2])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    chunk_n = totals[0].shape[1]
                    stores = 0
                    for c, acc in enumerate(totals):
                        cols = pl.ds(c * chunk_n, chunk_n)
                        out = acc
                        if rowwise:
                            col_scale = plgpu.load(scale_b_smem.at[wg, cols], layout=plgpu.Layout.WGMMA.reduce(0))
                            out = out * lax.broadcast_in_dim(row_scale, acc.shape, [0])
                            out = out * lax.broadcast_in_dim(col_scale, acc.shape, [1])
                        if has_bias:
                            bias = plgpu.load(bias_smem.at[wg, cols], layout=plgpu.Layout.WGMMA.reduce(0))
                            out = out + lax.broadcast_in_dim(bias, acc.shape, [1])
                        out = out.astype(out_dtype)
                        for epi_mi in range(tile_m // epi_m):
                            for epi_ni in range(chunk_n // epi_n):
                                slot = stores % 2
                                stores += 1
                                epi_m_slice = slice(epi_mi * epi_m, (epi_mi + 1) * epi_m)
                                epi_n_slice = slice(epi_ni * epi_n, (epi_ni + 1) * epi_n)
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg, slot] = out[epi_m_slice, epi_n_slice]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    out_gmem.at[out_m_slice, cta_n_slice]
                                    .at[wg_m_slice, wg_n_slice]
                                    .at[epi_m_slice, pl.ds(c * chunk_n + epi_ni * epi_n, epi_n)],
                                )

                if config.overlap_promotion:

                    @functools.partial(
                        pl.run_scoped,
                        first=plgpu.ACC((tile_m, tile_n), jnp.float32),
                        second=plgpu.ACC((tile_m, tile_n), jnp.float32),
                    )
                    def _overlapped_scope(first, second):
                        # Before the first k-block nothing is in flight: a zero accumulator, scale 0.
                        scale = None
                        if block_scales:
                            length = (tile_m, tile_n)[scale_dim]
                            layout = plgpu.Layout.WGMMA.reduce(1 - scale_dim)
                            scale = plgpu.layout_cast(jnp.zeros((length,), jnp.float32), layout)
                        accs[:] = [first, second]
                        carry = eval_pipeline((_zeros((tile_m, tile_n)), scale))
                        epilogue((_finish_overlapped(carry, k_iters, accs, scale_dim),))

                elif config.promote:
                    epilogue(eval_pipeline(_promoted_zeros(tile_m, tile_n, chunk)))
                else:

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _acc_scope(acc_ref):
                        epilogue((eval_pipeline(acc_ref)[...],))

            def mma_body(indices, a_smem, b_smem, *stages_and_carry):
                # Block scales: this k-step's scale_a slab, and with pipelined_weight_scales its
                # weight-block scales from the CTA's first block on.
                *scale_stage, carry = stages_and_carry
                scales = None
                if block_scales:
                    kb = indices[0] + split * k_iters  # this k-block of all of K

                    def weight_block_scale(block):  # this k-block's scale of weight block `block`
                        if weight_slab:
                            return plgpu.load(scale_stage[1].at[0, block - weight_slab_start])
                        return plgpu.load(scale_b_gmem.at[block, kb])

                    if config.swap_ab:
                        # The warpgroup's 64 weight rows lie in one weight block: its scale (a
                        # scalar, cached) times each chunk's token scales of this k-block.
                        block_scale = weight_block_scale(wg_m0 // tbs.PROMOTE_N)
                        wg_col0 = 0 if config.wg_split == "m" else wg * tile_n
                        scales = tuple(
                            (
                                plgpu.load(
                                    scale_stage[0].at[0, pl.ds(wg_col0 + c * chunk, chunk)],
                                    layout=plgpu.Layout.WGMMA.reduce(0),
                                )
                                * block_scale,
                                1,
                            )
                            for c in range(chunks)
                        )
                    else:
                        # The warpgroup's row scales for this k-block times each column chunk's
                        # weight-block scale (a scalar, cached: cta_n / 128 of them a CTA a k-block).
                        row_scale = plgpu.load(
                            scale_stage[0].at[0, wg if config.wg_split == "m" else 0],
                            layout=plgpu.Layout.WGMMA.reduce(1),
                        )
                        blocks = [(wg_n0 + c * chunk) // tbs.PROMOTE_N for c in range(chunks)]
                        scales = tuple((row_scale * weight_block_scale(block), 0) for block in blocks)
                a_tile, b_tile = a_smem.at[wg_m_slice], b_smem.at[wg_n_slice]
                if config.overlap_promotion:
                    scale = None if scales is None else scales[0][0]
                    return _overlapped_step(carry, indices[0], accs, a_tile, b_tile, scale, scale_dim, interpret)
                return _mma_step(carry, a_tile, b_tile, config.promote, scales)

            pipeline_state = None
            if config.persistent_pipeline:
                # One pipeline across this SM's tiles: the next tile's first k-blocks load while
                # this tile's last ones are consumed and its epilogue runs.
                last = loop_info.local_index == loop_info.num_local_steps - 1
                pipeline_state = jnp.where(
                    loop_info.local_index == 0,
                    int(plgpu.PipelinePipeline.START),
                    jnp.where(last, int(plgpu.PipelinePipeline.STOP), int(plgpu.PipelinePipeline.STEADY)),
                )
            operands = [a_gmem.at[cta_m_slice, k_slice], b_gmem.at[cta_n_slice, k_slice]]
            kb_slice = pl.ds(split * k_iters, k_iters)
            if block_scales and config.swap_ab:
                operands.append(scale_a_gmem.at[kb_slice, pl.ds(n_idx * cta_n, _token_slab(config))])
            elif block_scales:
                operands.append(scale_a_gmem.at[kb_slice, pl.ds(m_idx * (cta_m // tile_m), cta_m // tile_m), :])
            if weight_slab:
                operands.append(scale_b_gmem.at[kb_slice, pl.ds(weight_slab_start, WEIGHT_SLAB_FLOATS)])
            get_pipeline(mma_body, compute_context, pipeline_state)(*operands, allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _vector(scale: jax.Array, length: int) -> jax.Array:
    """A (1,)/(L,)/(L, 1)/() float32 scale as a (length,) vector."""
    return jnp.broadcast_to(scale.astype(jnp.float32).reshape(-1), (length,))


def _compiler_params():
    return plgpu.CompilerParams(approx_math=False)


def gemm(qinput, weight, scale_a, scale_b, bias, out_dtype, *, config: GemmConfig, block_scales=False, interpret=False):
    """`(Mp, N)` out_dtype: the kernel under `config` on padded operands, `qinput (Mp, K)` and
    `weight (N, K)` with Mp a multiple of `config.m_multiple`, N of `config.n_multiple`.

    Rowwise: `scale_a (Mp,)`, `scale_b (N,)`. With `block_scales`: `scale_b (N / 128, K / 128)` and
    `scale_a` k-block-major, `(K / 128, Mp / tile_m, tile_m)`, or `(K / 128, Mp)` with `swap_ab`.
    With `config.raw_out` (split K, swapped operands) the kernel writes float32 sums and one XLA
    fusion adds the K slices, transposes, scales, adds the bias and casts.
    """
    if block_scales and config.pipelined_weight_scales:
        scale_b = _pipelined_weight_scales(scale_b)
    if not config.raw_out:
        return gemm_large_m(
            qinput,
            weight,
            scale_a,
            scale_b,
            bias,
            out_dtype,
            config=config,
            block_scales=block_scales,
            interpret=interpret,
        )
    a, b = (weight, qinput) if config.swap_ab else (qinput, weight)
    if config.swap_ab and block_scales:
        scale_a = jnp.pad(scale_a, ((0, 0), (0, _token_slab(config) - config.cta_n)), constant_values=1.0)
    kernel_scales = (scale_b, scale_a) if config.swap_ab and not block_scales else (scale_a, scale_b)
    sums = gemm_large_m(
        a, b, *kernel_scales, None, jnp.float32, config=config, block_scales=block_scales, interpret=interpret
    )
    sums = sums.reshape(config.k_splits, a.shape[0], b.shape[0]).sum(0)
    if config.swap_ab:
        sums = sums.T
    if not block_scales:
        sums = sums * scale_a[:, None] * scale_b[None, :]
    if bias is not None:
        sums = sums + bias[: sums.shape[1]]  # the kernel's bias may cover the last tile's columns past N
    return sums.astype(out_dtype)


def gemm_large_m(
    qinput, weight, scale_a, scale_b, bias, out_dtype, *, config: GemmConfig, block_scales=False, interpret=False
):
    """The kernel on its own operands (`_gemm_kernel`; `gemm` swaps them for `swap_ab`): `qinput
    (Mp, K)` with Mp a multiple of config.cluster_m, `weight (N, K)`; returns `(Mp, N)` out_dtype,
    or with `config.raw_out` the `(k_splits * Mp, N)` float32 sums of the K slices."""
    m, k = qinput.shape
    n = weight.shape[0]
    cluster = {} if config.cluster is None else dict(cluster=(2,), cluster_names=("cluster",))
    out_rows = m * config.k_splits
    kernel = plgpu.kernel(
        functools.partial(_gemm_kernel, config=config, block_scales=block_scales, interpret=interpret),
        out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
        grid=(tbs.grid_slots(config, platform.num_sms()),),
        grid_names=("sm",),
        **cluster,
        num_threads=3,
        thread_name="wg",
        compiler_params=_compiler_params(),
        interpret=_interpret_params() if interpret else None,
    )
    kind = "block_gemm" if block_scales else "gemm"
    name = f"fp8_{kind}_{config.cta_m}x{config.cta_n}x{config.tile_k}_s{config.stages}"
    name += "_swapped" * config.swap_ab + f"_k{config.k_splits}" * (config.k_splits > 1)
    with jax.named_scope(name):
        return kernel(qinput, weight, scale_a, scale_b, bias)


def scaled_mm(
    qinput: jax.Array,
    weight: jax.Array,
    scale_a: jax.Array,
    scale_b: jax.Array,
    bias: jax.Array | None,
    out_dtype,
    *,
    interpret: bool = False,
    config: GemmConfig | None = None,
) -> jax.Array:
    """`(scale_a * scale_b) * (qinput @ weight.T) + bias` in `out_dtype`, float32 accumulation.

    Args:
      qinput: `(M, K)` float8_e4m3fn, any M (padded here, sliced off).
      weight: `(N, K)` float8_e4m3fn; K and N multiples of 16. The kernel tiles multiples of 128;
        other shapes are zero-padded up to them here, a copy of both operands each call.
      scale_a: float32 `()`, `(1,)`, `(1, 1)`, `(M,)` or `(M, 1)`.
      scale_b: float32 `()`, `(1,)`, `(1, 1)`, `(N,)` or `(N, 1)`.
      bias: `(N,)` or None.
      out_dtype: bfloat16, float16 or float32.
      interpret: run under Mosaic GPU interpret mode (CPU tests).
      config: force a schedule and its tiles (benchmarks); default chosen by shape.
    """
    if qinput.ndim != 2 or weight.ndim != 2 or qinput.shape[1] != weight.shape[1]:
        raise ValueError(f"need qinput (M, K) and weight (N, K), got {qinput.shape} and {weight.shape}")
    if qinput.dtype != jnp.float8_e4m3fn or weight.dtype != jnp.float8_e4m3fn:
        raise NotImplementedError(
            f"the Hopper kernel takes float8_e4m3fn operands only, got {qinput.dtype} and {weight.dtype}"
        )
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise NotImplementedError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    m, k = qinput.shape
    n = weight.shape[0]
    for name, size in (("K", k), ("N", n)):
        if size <= 0 or size % SHAPE_MULTIPLE:
            raise ValueError(
                f"{name}={size} must be a positive multiple of {SHAPE_MULTIPLE} (TMA copies 16-byte rows); "
                "the XLA paths take any shape"
            )
    for name, scale, length in (("scale_a", scale_a, m), ("scale_b", scale_b, n)):
        if scale.size not in (1, length):
            raise ValueError(f"{name} must have 1 or {length} elements, got shape {tuple(scale.shape)}")
        validation.check_scale_values(name, scale)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    kp, np_ = layout.round_up(k, K_MULTIPLE), layout.round_up(n, N_MULTIPLE)
    if (kp, np_) != (k, n):
        # Zero codes add nothing to the dot; the padded channels (scale 1, no bias) are sliced off.
        qinput = jnp.pad(qinput, ((0, 0), (0, kp - k)))
        weight = jnp.pad(weight, ((0, np_ - n), (0, kp - k)))
        if scale_b.size == n:
            scale_b = jnp.pad(_vector(scale_b, n), (0, np_ - n), constant_values=1.0)
        if bias is not None:
            bias = jnp.pad(bias, (0, np_ - n))
        out = scaled_mm(qinput, weight, scale_a, scale_b, bias, out_dtype, interpret=interpret, config=config)
        return out[:, :n]

    if config is None:
        config = tbs.default_config(m, k, n, out_dtype.itemsize, platform.num_sms())
    elif config.pipelined_weight_scales:
        raise ValueError(f"pipelined_weight_scales applies to block scales only (block_scaled_mm), got {config}")
    else:
        config = tbs.fit_stages(config, out_dtype.itemsize, k)
        config = tbs.fit_grid(config, layout.round_up(m, config.m_multiple), n, platform.num_sms())
    if k % (config.tile_k * config.k_splits) or n % config.n_multiple:
        raise ValueError(
            f"{k=} and {n=} must be multiples of tile_k * k_splits = {config.tile_k * config.k_splits} and "
            f"{config.n_multiple} under {config}"
        )
    mp = layout.round_up(m, config.m_multiple)
    out = gemm(
        _pad_rows(qinput, mp),
        weight,
        _pad_rows(_vector(scale_a, m), mp),
        _vector(scale_b, n),
        None if bias is None else bias.astype(jnp.float32),
        out_dtype,
        config=config,
        interpret=interpret,
    )
    return out if mp == m else out[:m]
