"""Block sizes for the TPU kernels: a table keyed by generation and shape, a fallback, and the checks.

Tiling rules (Mosaic): the last two dims of every block are multiples of the array's native tile,
(8, 128) for 32-bit, (16, 128) for 16-bit and (32, 128) for 8-bit types, or equal to the full dim.
The wrappers pad every operand to block multiples, so the GEMM's blocks are always multiples:
  x (tile_m, tile_k) fp8   -> tile_m % 32, tile_k % 128
  w (tile_n, tile_k) fp8   -> tile_n % 32, tile_k % 128
  out (tile_m, tile_n)     -> tile_n % 128
The quant kernel reads whole rows (block last dim = K, the full dim) and needs only tile_m % 32.

The table holds starting points chosen from the VMEM arithmetic below for common LLM projection
shapes; no entry was timed on a chip. A shape not in the table gets `default_block_sizes`: the
largest tiles up to a per-generation cap that divide the 128-padded N and K (so padding adds no
work), halved until the VMEM estimate fits the budget. The block-scaled GEMM's tiles follow a rule
tied to its weight blocks instead (`default_block_gemm_sizes`, at the end of this module).
"""

import dataclasses

import numpy as np

from w8a8_jax import layout
from w8a8_jax.kernels.tpu import hardware

# Native tile of 8-bit arrays: 32 sublanes (4 values packed per 32-bit sublane) x 128 lanes.
SUBLANES_8BIT = 32
LANES = 128

# Part of a TensorCore's VMEM the kernels plan to use; Mosaic keeps internal scratch in the rest.
VMEM_BUDGET_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """One GEMM configuration; `tile_m` is an upper bound, lowered for small M.

    Attributes:
      tile_m: rows of x and out per block; multiple of 32 (fp8 x tiles are (32, 128)).
      tile_n: output columns (rows of the (N, K) weight) per block; multiple of 128 (out's lanes).
      tile_k: contraction per block; multiple of 128 (the lane dim of both fp8 operands).
    """

    tile_m: int
    tile_n: int
    tile_k: int

    def __str__(self) -> str:
        return f"tm{self.tile_m}_tn{self.tile_n}_tk{self.tile_k}"


# (generation, m_upper, k, n) -> BlockSizes, sorted. A shape (m, k, n) uses the entry of its
# generation, k and n with the smallest m_upper >= m (the last one for larger m).
TUNED_BLOCK_SIZES: dict[tuple[str, int, int, int], BlockSizes] = {
    ("v5e", 128, 4096, 4096): BlockSizes(128, 1024, 2048),
    ("v5e", 128, 4096, 14336): BlockSizes(128, 1024, 2048),
    ("v5e", 128, 14336, 4096): BlockSizes(128, 1024, 2048),
    ("v5e", 8192, 4096, 4096): BlockSizes(512, 512, 1024),
    ("v5e", 8192, 4096, 14336): BlockSizes(512, 512, 1024),
    ("v5e", 8192, 14336, 4096): BlockSizes(512, 512, 1024),
    ("v6e", 128, 4096, 4096): BlockSizes(128, 1024, 2048),
    ("v6e", 128, 4096, 14336): BlockSizes(128, 1024, 2048),
    ("v6e", 128, 14336, 4096): BlockSizes(128, 1024, 2048),
    ("v6e", 8192, 4096, 4096): BlockSizes(512, 1024, 1024),
    ("v6e", 8192, 4096, 14336): BlockSizes(512, 1024, 1024),
    ("v6e", 8192, 14336, 4096): BlockSizes(512, 1024, 1024),
    ("v7", 128, 4096, 4096): BlockSizes(128, 1024, 2048),
    ("v7", 128, 4096, 14336): BlockSizes(128, 1024, 2048),
    ("v7", 128, 14336, 4096): BlockSizes(128, 1024, 2048),
    ("v7", 8192, 4096, 4096): BlockSizes(512, 1024, 1024),
    ("v7", 8192, 4096, 14336): BlockSizes(512, 1024, 1024),
    ("v7", 8192, 14336, 4096): BlockSizes(512, 1024, 1024),
}

# Fallback caps per generation: (tile_m, tile_n, tile_k). v4 has 16 MiB of VMEM per core.
_DEFAULT_CAPS = {
    "v4": (256, 512, 512),
    "v5e": (512, 512, 1024),
    "v5p": (512, 512, 1024),
    "v6e": (512, 1024, 1024),
    "v7": (512, 1024, 1024),
}


def _largest_dividing_tile(size: int, cap: int, unit: int) -> int:
    """The largest multiple of `unit` <= cap that divides `size` (itself a multiple of `unit`)."""
    tile = min(cap, size) // unit * unit
    while size % tile:
        tile -= unit
    return tile


def check_tiling(blocks: BlockSizes) -> None:
    """Raises ValueError naming the first block size that breaks the TPU tiling rules."""
    for name, value, unit in (
        ("tile_m", blocks.tile_m, SUBLANES_8BIT),
        ("tile_n", blocks.tile_n, LANES),
        ("tile_k", blocks.tile_k, LANES),
    ):
        if value <= 0 or value % unit:
            raise ValueError(f"{name}={value} must be a positive multiple of {unit} (TPU tiling of fp8 operands)")


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def gemm_vmem_bytes(
    blocks: BlockSizes, *, x_dtype, mxu_dtype, out_dtype, quantize_in_kernel: bool, row_scales: bool
) -> int:
    """Estimated VMEM of one GEMM program: double-buffered blocks, scratch and in-kernel temporaries."""
    tm, tn, tk = blocks.tile_m, blocks.tile_n, blocks.tile_k
    buffered = tm * tk * _itemsize(x_dtype) + tn * tk + tm * tn * _itemsize(out_dtype)
    # (1, tn) scale and bias rows occupy 8 sublanes; a (tm, 1) scale column occupies 128 lanes.
    buffered += 2 * 8 * tn * 4 + (tm * LANES * 4 if row_scales else 0)
    total = 2 * buffered + tm * tn * 4  # double buffers + float32 accumulator
    if np.dtype(mxu_dtype) != np.dtype(x_dtype) or quantize_in_kernel:
        total += tm * tk * _itemsize(mxu_dtype)  # x tile as MXU operand (cached when quantized here)
    if np.dtype(mxu_dtype).itemsize > 1:
        total += tn * tk * _itemsize(mxu_dtype)  # weight tile upcast to bf16
    if quantize_in_kernel:
        total += 2 * tm * tk * 4 + tm * LANES * 4  # float32 rows while quantizing, (tm, 1) scales
    return total


def quant_vmem_bytes(tile_m: int, k: int, x_dtype) -> int:
    """Estimated VMEM of one per-token quant program over `tile_m` whole rows of length `k`."""
    k_lanes = layout.round_up(k, LANES)
    buffered = tile_m * k_lanes * (_itemsize(x_dtype) + 1) + tile_m * LANES * 4
    return 2 * buffered + 2 * tile_m * k_lanes * 4  # double buffers + float32 temporaries


def vmem_budget(gen: hardware.Generation) -> int:
    return int(gen.vmem_bytes * VMEM_BUDGET_FRACTION)


def vmem_limit(estimate: int, gen: hardware.Generation) -> int:
    """The `vmem_limit_bytes` to compile with: the estimate plus headroom, within the core's VMEM."""
    return min(gen.vmem_bytes, max(estimate * 3 // 2, 16 * hardware.MiB))


def check_vmem(estimate: int, gen: hardware.Generation, what: str) -> None:
    budget = vmem_budget(gen)
    if estimate > budget:
        raise ValueError(
            f"{what} needs about {estimate / hardware.MiB:.1f} MiB of VMEM, over the "
            f"{budget / hardware.MiB:.1f} MiB budget on TPU {gen.name} "
            f"({VMEM_BUDGET_FRACTION:.0%} of {gen.vmem_bytes // hardware.MiB} MiB); choose smaller blocks"
        )


def default_block_sizes(gen: hardware.Generation, m: int, k: int, n: int) -> BlockSizes:
    """The documented fallback for shapes not in the table (see the module docstring)."""
    cap_m, cap_n, cap_k = _DEFAULT_CAPS[gen.name]
    return BlockSizes(
        tile_m=min(cap_m, layout.round_up(m, SUBLANES_8BIT)),
        tile_n=_largest_dividing_tile(layout.round_up(n, LANES), cap_n, LANES),
        tile_k=_largest_dividing_tile(layout.round_up(k, LANES), cap_k, LANES),
    )


def get_block_sizes(gen: hardware.Generation, m: int, k: int, n: int) -> BlockSizes:
    """Table entry for (generation, k, n) and the smallest m bucket >= m, else the fallback."""
    entries = sorted(
        (m_upper, blocks)
        for (g, m_upper, kk, nn), blocks in TUNED_BLOCK_SIZES.items()
        if (g, kk, nn) == (gen.name, k, n)
    )
    if not entries:
        return default_block_sizes(gen, m, k, n)
    blocks = next((b for m_upper, b in entries if m <= m_upper), entries[-1][1])
    return dataclasses.replace(blocks, tile_m=min(blocks.tile_m, layout.round_up(m, SUBLANES_8BIT)))


def fit_vmem(
    blocks: BlockSizes, gen: hardware.Generation, *, k: int, n: int, shrink_k: bool = True, **vmem_args
) -> BlockSizes:
    """Halves tile_k (if `shrink_k`), then tile_n, then tile_m, keeping them legal and dividing the
    padded K and N, until the estimate fits the budget; returns `blocks` unchanged if it fits."""
    k_pad, n_pad = layout.round_up(k, LANES), layout.round_up(n, LANES)
    while gemm_vmem_bytes(blocks, **vmem_args) > vmem_budget(gen):
        if shrink_k and blocks.tile_k > LANES:
            blocks = dataclasses.replace(blocks, tile_k=_largest_dividing_tile(k_pad, blocks.tile_k // 2, LANES))
        elif blocks.tile_n > LANES:
            blocks = dataclasses.replace(blocks, tile_n=_largest_dividing_tile(n_pad, blocks.tile_n // 2, LANES))
        elif blocks.tile_m > SUBLANES_8BIT:
            blocks = dataclasses.replace(blocks, tile_m=max(SUBLANES_8BIT, blocks.tile_m // 2 // 32 * 32))
        else:
            break
    return blocks


# --- the block-scaled GEMM -------------------------------------------------------------------------
#
# Each k-step applies one k-block's scales and each n-tile one weight block row's, so besides the
# tiling rules above: tile_k divides bk (tile_k == bk when the activation is quantized in-kernel: the
# group's amax needs the whole group) and tile_n divides bn. With both multiples of 128, bn and bk
# must be too. No shape was timed on a chip, so there is no table: `default_block_gemm_sizes` is
# a rule.

# Part of a TensorCore's SMEM the block GEMM's weight scales may take; Mosaic keeps its own scalars
# (grid indices, DMA semaphores) in the rest.
SMEM_BUDGET_FRACTION = 0.5


def check_block_tiling(blocks: BlockSizes, block_size: tuple[int, int], *, quantize_in_kernel: bool) -> None:
    """Raises ValueError naming the first block size that breaks the block GEMM's rules (the TPU
    tiling rules, then tile_k | bk, or tile_k == bk when quantizing in-kernel, and tile_n | bn)."""
    check_tiling(blocks)
    bn, bk = block_size
    if quantize_in_kernel and blocks.tile_k != bk:
        raise ValueError(
            f"tile_k={blocks.tile_k} must equal the block's bk={bk} to quantize per token group in-kernel "
            "(a group's scale needs its whole group in one k-step)"
        )
    if bk % blocks.tile_k:
        raise ValueError(
            f"tile_k={blocks.tile_k} must divide the block's bk={bk} (each k-step must lie in one k-block, "
            "whose scales it applies)"
        )
    if bn % blocks.tile_n:
        raise ValueError(
            f"tile_n={blocks.tile_n} must divide the block's bn={bn} (each n-tile must lie in one weight block row)"
        )


def check_block_size_tileable(block_size: tuple[int, int]) -> None:
    """Raises ValueError unless bn and bk are multiples of 128, the only blocks a tile can divide."""
    bn, bk = block_size
    if bn % LANES or bk % LANES:
        raise ValueError(
            f"block_size (bn, bk) = {(bn, bk)}: the TPU block GEMM needs bn and bk multiples of {LANES} "
            f"(tile_n must divide bn and tile_k divide bk, each a multiple of {LANES})"
        )


def block_gemm_vmem_bytes(
    blocks: BlockSizes, *, x_dtype, mxu_dtype, out_dtype, quantize_in_kernel: bool, cached_k_steps: int = 0
) -> int:
    """Estimated VMEM of one block GEMM program: the rowwise GEMM's (each k-step's `(tile_m, 1)`
    activation scales counted as its per-row scales), plus, where the quantized row block is cached
    across N blocks, `cached_k_steps` code tiles in the MXU dtype and `(tile_m, 1)` float32 scale
    columns (128 lanes each)."""
    total = gemm_vmem_bytes(
        blocks,
        x_dtype=x_dtype,
        mxu_dtype=mxu_dtype,
        out_dtype=out_dtype,
        quantize_in_kernel=quantize_in_kernel,
        row_scales=True,
    )
    tm, tk = blocks.tile_m, blocks.tile_k
    return total + cached_k_steps * tm * (tk * _itemsize(mxu_dtype) + LANES * 4)


def block_scales_smem_bytes(n: int, k: int, block_size: tuple[int, int]) -> int:
    """SMEM of the weight scales `(ceil(N / bn), ceil(K / bk))` float32, held whole by the kernel."""
    bn, bk = block_size
    return -(-n // bn) * -(-k // bk) * 4


def smem_budget(gen: hardware.Generation) -> int:
    return int(gen.smem_bytes * SMEM_BUDGET_FRACTION)


def default_block_gemm_sizes(
    gen: hardware.Generation, m: int, n: int, block_size: tuple[int, int], *, quantize_in_kernel: bool
) -> BlockSizes:
    """The block GEMM's tile rule: tile_k = bk when quantizing in-kernel, else the largest multiple
    of 128 up to the generation's k cap that divides bk (bk = 128: 128); tile_n the largest multiple
    of 128 up to the generation's n cap and the 128-padded N that divides bn (bn = 128: 128); tile_m
    as `default_block_sizes` (`fit_block_vmem` then shrinks them to the VMEM budget). Raises
    ValueError where bn or bk is not a multiple of 128."""
    check_block_size_tileable(block_size)
    (bn, bk), (cap_m, cap_n, cap_k) = block_size, _DEFAULT_CAPS[gen.name]
    return BlockSizes(
        tile_m=min(cap_m, layout.round_up(m, SUBLANES_8BIT)),
        tile_n=_largest_dividing_tile(bn, min(cap_n, layout.round_up(n, LANES)), LANES),
        tile_k=bk if quantize_in_kernel else _largest_dividing_tile(bk, cap_k, LANES),
    )


def fit_block_vmem(
    blocks: BlockSizes, gen: hardware.Generation, block_size: tuple[int, int], *, quantize_in_kernel: bool, **vmem_args
) -> BlockSizes:
    """Halves tile_k (not when quantizing in-kernel), then tile_n, then tile_m, each still dividing
    bk, bn (a multiple of 32 for tile_m), until `block_gemm_vmem_bytes` fits the budget; returns
    `blocks` unchanged if it fits."""
    bn, bk = block_size
    while block_gemm_vmem_bytes(blocks, quantize_in_kernel=quantize_in_kernel, **vmem_args) > vmem_budget(gen):
        if not quantize_in_kernel and blocks.tile_k > LANES:
            blocks = dataclasses.replace(blocks, tile_k=_largest_dividing_tile(bk, blocks.tile_k // 2, LANES))
        elif blocks.tile_n > LANES:
            blocks = dataclasses.replace(blocks, tile_n=_largest_dividing_tile(bn, blocks.tile_n // 2, LANES))
        elif blocks.tile_m > SUBLANES_8BIT:
            blocks = dataclasses.replace(blocks, tile_m=max(SUBLANES_8BIT, blocks.tile_m // 2 // 32 * 32))
        else:
            break
    return blocks
