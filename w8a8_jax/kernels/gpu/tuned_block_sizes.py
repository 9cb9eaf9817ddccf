"""Tuning configs for the Hopper fp8 GEMM, chosen by shape, with a documented fallback.

`GemmConfig` describes the schedule of `scaled_mm.py`: a persistent grid of CTA tiles, two
consumer warpgroups and one TMA producer warpgroup, a multi-stage shared-memory ring.

`DEFAULT_GEMM` is the config measured best over the Llama shapes (benchmarks/NOTES.md): CTA
128x256 with promotion in 128-column chunks, clusters of 2 CTAs along M multicasting B, one
pipeline across an SM's tiles. `NARROW_GEMM` (CTA 128x128) takes N that is not a multiple of 256,
M of one CTA row, and shapes whose wide tiles would leave more of the last wave of SMs idle
(`wave_efficiency`). `KERNEL_FASTER_THAN_XLA` is the measured table the dispatch plan reads.
"""

import dataclasses

# Hopper shared memory per block (bytes) after the opt-in; the ring, the epilogue staging and the
# scale vectors must fit in it.
SMEM_BYTES = 232_448
# Barriers, alignment and the pipeline's own bookkeeping.
SMEM_SLACK = 4_096
# With promotion, columns of the `wgmma` accumulator: a wider warpgroup tile is promoted in chunks
# of this many columns, so its registers are the float32 total plus one 64 x PROMOTE_N chunk.
PROMOTE_N = 128


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Large-M schedule.

    Attributes:
      tile_m: rows of the accumulator of one consumer warpgroup; multiple of 64 (`wgmma` M).
      tile_n: columns of one warpgroup's accumulator. 128x128 float32 is 128 registers a thread;
        128x256 spills (measured ~70 TFLOP/s), so keep tile_m * tile_n <= 128 * 128.
      tile_k: fp8 elements per k-step; 128 = one 128-byte swizzle row.
      stages: depth of the shared-memory ring (reduced automatically to what fits).
      wg_split: "n" puts the two warpgroups side by side along N (CTA tile tile_m x 2*tile_n),
        "m" stacks them along M (CTA tile 2*tile_m x tile_n).
      grid_minor: "m" or "n", the minor dimension of the planar-snake rasterization.
      grid_tile_width: width of the snake's bands (output tiles sharing L2-resident operands).
      epi_tile_m, epi_tile_n: sub-tile of the epilogue staged through shared memory.
      promote: add each k-block's `wgmma` result into a separate float32 register total (fp8
        `wgmma` accumulates with reduced precision), PROMOTE_N columns at a time. Costs a second
        accumulator of tile_m x min(tile_n, PROMOTE_N): with tile_m = 64, tile_n = 128 needs 128
        registers a thread for the two, tile_n = 256 needs 192.
      persistent_pipeline: one TMA pipeline across all of an SM's tiles (no refill bubble per
        tile); needs k-blocks a multiple of the stages.
      cluster: None, or "m" / "n": pairs of CTAs adjacent along M (N) form a cluster and each B
        (A) tile is loaded once from L2 and multicast to both, halving that operand's L2 traffic.
    """

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    wg_split: str = "m"
    grid_minor: str = "n"
    grid_tile_width: int = 16
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    promote: bool = True
    persistent_pipeline: bool = False
    cluster: str | None = None

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" else 1)

    @property
    def cluster_m(self) -> int:
        """Rows of output one cluster covers (the M padding unit)."""
        return self.cta_m * (2 if self.cluster == "m" else 1)

    @property
    def cluster_n(self) -> int:
        """Columns of output one cluster covers (N must divide by it)."""
        return self.cta_n * (2 if self.cluster == "n" else 1)


DEFAULT_GEMM = GemmConfig(tile_n=256, epi_tile_n=32, cluster="m", persistent_pipeline=True)
NARROW_GEMM = GemmConfig(cluster="m", persistent_pipeline=True)


def _smem_bytes(config: GemmConfig, out_itemsize: int, stages: int) -> int:
    ring = stages * (config.cta_m + config.cta_n) * config.tile_k
    epilogue = 2 * 2 * config.epi_tile_m * config.epi_tile_n * out_itemsize
    vectors = 2 * (config.tile_m + 2 * config.tile_n) * 4
    return ring + epilogue + vectors + SMEM_SLACK


def fit_stages(config: GemmConfig, out_itemsize: int, k: int) -> GemmConfig:
    """The config with as many ring stages (<= config.stages, >= 2) as fit in shared memory; a
    persistent pipeline also needs the k-blocks (k / tile_k) to be a multiple of the stages, else
    it is turned off."""
    stages = config.stages
    while stages > 2 and _smem_bytes(config, out_itemsize, stages) > SMEM_BYTES:
        stages -= 1
    persistent = config.persistent_pipeline
    if persistent:
        k_blocks = k // config.tile_k
        fitting = [s for s in range(stages, 1, -1) if k_blocks % s == 0]
        persistent = bool(fitting)
        stages = fitting[0] if fitting else stages
    return dataclasses.replace(config, stages=stages, persistent_pipeline=persistent)


def grid_slots(config: GemmConfig, num_sms: int) -> int:
    """CTAs (or clusters of 2) the persistent grid launches: one per SM (pair of SMs), at least one."""
    return max(1, num_sms // (1 if config.cluster is None else 2))


def fit_grid(config: GemmConfig, m: int, n: int, num_sms: int) -> GemmConfig:
    """The config with the persistent pipeline kept only where every CTA (cluster) of the grid gets
    at least 2 output tiles: the first tile starts the pipeline and the last one drains it, and a
    single tile cannot be both (its CTA would exit with its cluster peer still signalling it)."""
    tiles = (m // config.cluster_m) * (n // config.cluster_n)
    if config.persistent_pipeline and tiles < 2 * grid_slots(config, num_sms):
        return dataclasses.replace(config, persistent_pipeline=False)
    return config


def wave_efficiency(config: GemmConfig, m: int, n: int, num_sms: int) -> float:
    """Busy share of the grid's CTA (cluster) slots over its waves of output tiles: 1.0 when the
    tiles fill every wave, 0.5 when the last of two waves is empty but for one tile."""
    slots = grid_slots(config, num_sms)
    tiles = -(-m // config.cluster_m) * (n // config.cluster_n)
    return tiles / (-(-tiles // slots) * slots)


# The wide default yields to the narrow config where it would leave this much more of the last
# wave idle (measured: 1024x4096x6144 ran at 953 TFLOP/s wide, 0.73 of its slots busy, and 1187
# narrow, 0.97; where both fill their waves alike, wide won by 0-15%).
WAVE_SLACK = 0.1


def gemm_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int) -> GemmConfig:
    """The wide default or the narrow config (module docstring), fitted to N, to a single CTA row
    of M and to shared memory; N must divide by the CTA tile's N."""
    wide = (
        m > NARROW_GEMM.cta_m
        and n % DEFAULT_GEMM.cluster_n == 0
        and wave_efficiency(DEFAULT_GEMM, m, n, num_sms) + WAVE_SLACK >= wave_efficiency(NARROW_GEMM, m, n, num_sms)
    )
    config = DEFAULT_GEMM if wide else NARROW_GEMM
    if n % config.cluster_n:
        # N a multiple of 128 but not of the cluster's: stack the warpgroups and the cluster along M.
        config = dataclasses.replace(config, wg_split="m", cluster=config.cluster and "m")
    if config.cluster == "m" and m <= config.cta_m:
        # One CTA row of output: a cluster along M would pad M to two; pair CTAs along N instead.
        config = dataclasses.replace(config, cluster="n" if n % (2 * config.cta_n) == 0 else None)
    return fit_stages(config, out_itemsize, k)


# (m_bucket, k, n) where the kernel measured at least 3% faster than the faster of XLA's fp8 paths
# (both accumulating in float32) on an H100 (benchmarks/NOTES.md, "GPU kernels", v7); everywhere
# else the registered fused path hands the GEMM to XLA. Buckets between two measured ones that
# agree (256, 512, 2048) take their side; shapes and buckets not measured go to XLA. M <= 64 always
# goes to XLA: at M = 1 its float32 reduction and at M = 16 cuBLASLt beat the kernel's swapped-operand
# decode schedule (since removed; benchmarks/NOTES.md v7).
_ALL_M = (128, 256, 512, 1024, 2048, 4096, 8192)
KERNEL_FASTER_THAN_XLA: frozenset[tuple[int, int, int]] = frozenset(
    {
        # Llama-3-8B QKV: 370 vs 349 TFLOP/s at M=128, 1187-1273 vs 1002-1033 at M = 1024..8192.
        *((m, 4096, 6144) for m in _ALL_M),
        # Llama-3-8B gate/up: 593 vs 513 at M=128, 1244-1271 vs 1003-1033 at M = 1024..8192.
        *((m, 4096, 28672) for m in _ALL_M),
        # Llama-3-8B down: 1384-1430 vs 1258-1355 at M = 1024..8192 (335 vs 492 at M=128).
        *((m, 14336, 4096) for m in _ALL_M[3:]),
        # Llama-3-70B QKV: 584 vs 503 at M=128, 1266 vs 1218 at M=1024 (larger M not measured).
        *((m, 8192, 10240) for m in _ALL_M[:4]),
        # Llama-3-70B gate/up: 666 vs 614 at M=128, 1195-1347 vs 1138-1199 at M = 1024..8192.
        *((m, 8192, 57344) for m in _ALL_M),
        # Llama-3-70B down: 1330-1443 vs 1283-1399 at M = 1024..8192 (575 vs 654 at M=128).
        *((m, 28672, 8192) for m in _ALL_M[3:]),
        # 8192 x 8192: 1325-1345 vs 1224-1236 at M = 4096, 8192.
        *((m, 8192, 8192) for m in _ALL_M[5:]),
    }
)


def kernel_is_faster(m: int, k: int, n: int) -> bool:
    """Whether the measured table says the kernel beats XLA at this shape."""
    m_bucket = 1 << max(0, (min(m, 8192) - 1).bit_length())
    return (m_bucket, k, n) in KERNEL_FASTER_THAN_XLA
