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
work), halved until the VMEM estimate fits the budget.
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
