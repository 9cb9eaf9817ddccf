"""Tuning configs for the Hopper fp8 GEMM, chosen by shape, with a documented fallback.

`GemmConfig` describes the schedule of `scaled_mm.py`: a persistent grid of CTA tiles, two
consumer warpgroups and one TMA producer warpgroup, a multi-stage shared-memory ring.

`DEFAULT_GEMM` is the config measured best over the Llama shapes (benchmarks/NOTES.md): CTA
128x256 with promotion in 128-column chunks, clusters of 2 CTAs along M multicasting B, one
pipeline across an SM's tiles. `NARROW_GEMM` (CTA 128x128) takes N that is not a multiple of 256,
M of one CTA row, and shapes whose wide tiles would leave more of the last wave of SMs idle
(`wave_efficiency`); the block-scaled kernel takes it at every M (`block_scales=True`: the wide
CTA's promotion spills with the block scales). `kernel_is_faster` is the measured rule the
dispatch plan reads: where, by its grid's fill of the SMs, the kernel beats XLA.

For the shapes whose output tiles underfill the SMs, `split_config` splits K (`GemmConfig.k_splits`)
where the model (`predicted_seconds`) says that pays by SPLIT_GAIN, and `decode_config`, for
decode-sized M, swaps the operands (`GemmConfig.swap_ab`) so the weight's rows fill `wgmma`'s 64-row
side and the few tokens its narrow side, and splits K too (`small_m_config` picks between them);
`default_config`, what both kernels launch, takes them where they apply (measured faster on the
H200). `overlapped_config`, which promotes each k-block under the next one's `wgmma`
(`GemmConfig.overlap_promotion`), measured 3x slower and is no default. `block_kernel_is_faster` is
the block kernel's rule against XLA's block GEMM.
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
# The CTA tile's N granularity (rows of the weight a CTA reads).
N_MULTIPLE = 128


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
      k_splits: K is cut into this many equal slices, each a work unit of its own: the kernel
        writes every unit's float32 sum and XLA adds the slices, then scales, adds the bias and
        casts (one rounding). Fills the SMs where the output tiles alone do not.
      overlap_promotion: each k-block's `wgmma` runs into one of two accumulators while the one
        before it is promoted (`wgmma_wait(1)`); the pipeline then releases each stage one step
        later. Measured 2.9-3.4x slower than without on the H200 (benchmarks/NOTES.md). Needs promotion and one chunk a
        warpgroup (tile_n <= PROMOTE_N: 3 accumulator tiles in registers), and cannot combine
        with the persistent pipeline (Pallas runs no pipeline of pipelines with delayed release).
      swap_ab: the kernel computes `out.T = weight @ qinput.T`: the weight is the `wgmma` A
        operand (its rows on the 64-row M side) and the tokens, padded to tile_n, the narrow N
        side, so decode-sized M wastes no tensor-core rows; XLA transposes the float32 result.
      pipelined_weight_scales: block scales only: each k-block's weight-block scales travel through
        the pipeline too (a 256-byte slab a stage) and are read from shared memory, where
        otherwise each k-step reads its scalars from global memory. Measured as fast, no faster.
      promote_n: columns of one promoted chunk, PROMOTE_N or 64: the `wgmma` accumulator a
        warpgroup holds beside its total (64 x promote_n float32), so 64 frees 32 registers a
        thread on a 128x256 CTA at the cost of twice the `wgmma` instructions (each re-reads its
        A tile from shared memory). Measured on the H200 there: the rowwise kernel 6% slower, the
        block kernel 2x slower (benchmarks/NOTES.md, "H200 v6"); off by default.
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
    k_splits: int = 1
    overlap_promotion: bool = False
    swap_ab: bool = False
    pipelined_weight_scales: bool = False
    promote_n: int = PROMOTE_N

    def __post_init__(self):
        if self.promote_n not in (64, PROMOTE_N) or self.tile_n % min(self.tile_n, self.promote_n):
            raise ValueError(f"promote_n must be 64 or {PROMOTE_N} and divide tile_n, got {self}")
        if self.overlap_promotion and (not self.promote or self.tile_n > PROMOTE_N):
            raise ValueError(f"overlap_promotion needs promote=True and tile_n <= {PROMOTE_N}, got {self}")

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

    @property
    def raw_out(self) -> bool:
        """Whether the kernel writes float32 sums for XLA to finish (split K or swapped operands)."""
        return self.k_splits > 1 or self.swap_ab

    @property
    def m_multiple(self) -> int:
        """The padding unit of the GEMM's M (the tokens): the kernel's B rows when swapped."""
        return self.cluster_n if self.swap_ab else self.cluster_m

    @property
    def n_multiple(self) -> int:
        """The unit the GEMM's N (the weight's rows) must divide by: the kernel's A rows when swapped."""
        return self.cluster_m if self.swap_ab else self.cluster_n


DEFAULT_GEMM = GemmConfig(tile_n=256, epi_tile_n=32, cluster="m", persistent_pipeline=True)
NARROW_GEMM = GemmConfig(cluster="m", persistent_pipeline=True)


def _smem_bytes(config: GemmConfig, out_itemsize: int, stages: int) -> int:
    ring = stages * (config.cta_m + config.cta_n) * config.tile_k
    epilogue = 2 * 2 * config.epi_tile_m * config.epi_tile_n * (4 if config.raw_out else out_itemsize)
    # float32 vectors: rowwise, the scale and bias vectors of both warpgroups; with block scales,
    # each stage's activation scales (and the weight's 64-float slab) and the bias. The larger, so
    # one fit serves both kernels.
    rowwise_vectors = 2 * (config.tile_m + 2 * config.tile_n) * 4
    weight_slab = 64 if config.pipelined_weight_scales else 0  # scaled_mm.WEIGHT_SLAB_FLOATS
    block_vectors = (stages * (config.cta_m + weight_slab) + 2 * config.tile_n) * 4
    return ring + epilogue + max(rowwise_vectors, block_vectors) + SMEM_SLACK


def fit_stages(config: GemmConfig, out_itemsize: int, k: int) -> GemmConfig:
    """The config with as many ring stages (<= config.stages, >= 2) as fit in shared memory; a
    persistent pipeline also needs a unit's k-blocks (k / tile_k / k_splits) to be a multiple of
    the stages, and overlapped promotion at least two of them, else each is turned off."""
    stages = config.stages
    while stages > 2 and _smem_bytes(config, out_itemsize, stages) > SMEM_BYTES:
        stages -= 1
    k_blocks = k // config.tile_k // config.k_splits
    overlap = config.overlap_promotion and k_blocks >= 2
    persistent = config.persistent_pipeline and not overlap
    if persistent:
        fitting = [s for s in range(stages, 1, -1) if k_blocks % s == 0]
        persistent = bool(fitting)
        stages = fitting[0] if fitting else stages
    return dataclasses.replace(config, stages=stages, persistent_pipeline=persistent, overlap_promotion=overlap)


def grid_slots(config: GemmConfig, num_sms: int) -> int:
    """CTAs (or clusters of 2) the persistent grid launches: one per SM (pair of SMs), at least one."""
    return max(1, num_sms // (1 if config.cluster is None else 2))


def work_units(config: GemmConfig, m: int, n: int) -> int:
    """Work units of `(m, k) @ (n, k).T` under `config`: CTA (cluster) output tiles times K slices."""
    rows, cols = (n, m) if config.swap_ab else (m, n)
    return -(-rows // config.cluster_m) * -(-cols // config.cluster_n) * config.k_splits


def fit_grid(config: GemmConfig, m: int, n: int, num_sms: int) -> GemmConfig:
    """The config with the persistent pipeline kept only where every CTA (cluster) of the grid gets
    at least 2 work units: the first unit starts the pipeline and the last one drains it, and a
    single unit cannot be both (its CTA would exit with its cluster peer still signalling it)."""
    if config.persistent_pipeline and work_units(config, m, n) < 2 * grid_slots(config, num_sms):
        return dataclasses.replace(config, persistent_pipeline=False)
    return config


def wave_efficiency(config: GemmConfig, m: int, n: int, num_sms: int) -> float:
    """Busy share of the grid's CTA (cluster) slots over its waves of output tiles: 1.0 when the
    tiles fill every wave, 0.5 when the last of two waves is empty but for one tile."""
    slots = grid_slots(config, num_sms)
    tiles = work_units(config, m, n)
    return tiles / (-(-tiles // slots) * slots)


# The wide default yields to the narrow config where it would leave this much more of the last
# wave idle (measured: 1024x4096x6144 ran at 953 TFLOP/s wide, 0.73 of its slots busy, and 1187
# narrow, 0.97; where both fill their waves alike, wide won by 0-15%).
WAVE_SLACK = 0.1


def gemm_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int, *, block_scales: bool = False) -> GemmConfig:
    """The wide default or the narrow config (module docstring), fitted to N, to a single CTA row
    of M and to shared memory; N must divide by the CTA tile's N. With `block_scales` always the
    narrow CTA (below)."""
    return fit_stages(_tile_config(m, n, num_sms, block_scales), out_itemsize, k)


# The block-scaled kernel takes the narrow CTA at every M. Its wide CTA's promotion holds a 64 x 128
# chunk and the 64 x 256 float32 total and, with the block scales, spills a dozen totals to local
# memory every k-step (the SASS of 4096 x 7168 x 24576 on the H200): the narrow CTA ran 1.03-1.17x
# the wide one at M = 1024 and 4096 of 7168 x 24576 and 18432 x 7168 (benchmarks/NOTES.md, "H200 v5").
def _tile_config(m: int, n: int, num_sms: int, block_scales: bool = False) -> GemmConfig:
    wide = (
        not block_scales
        and m > NARROW_GEMM.cta_m
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
    return config


def launch_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int, *, block_scales: bool = False) -> GemmConfig:
    """The config `scaled_mm` (with `block_scales`, `block_scaled_mm`) launches for `(m, k) @ (n, k).T`
    (N a multiple of 128): `gemm_config` with the persistent pipeline kept only where the grid
    allows it (`fit_grid`)."""
    config = gemm_config(m, k, n, out_itemsize, num_sms, block_scales=block_scales)
    return fit_grid(config, -(-m // config.cluster_m) * config.cluster_m, n, num_sms)


# The split-K model's rates, measured on the H200 (benchmarks/NOTES.md, "H200 v1"): the kernel's
# rate at large M (1,016-1,264 TFLOP/s) and a same-run bf16 copy's bytes/s (3.0-3.3 TB/s).
KERNEL_FLOPS = 1.2e15
COPY_BYTES_PER_S = 3.2e12
# K slices of a split: at most MAX_K_SPLITS, each at least MIN_SPLIT_K_BLOCKS k-blocks long.
MAX_K_SPLITS = 8
MIN_SPLIT_K_BLOCKS = 4
# A split is taken only where the model predicts it at most this share of the whole-K time: on the
# H200 (benchmarks/NOTES.md, "H200 v3") a predicted 5% gain measured a 7% loss (128 x 7168 x 24576,
# block scales), while the splits predicted 35-70% faster measured 1.3-1.6x.
SPLIT_GAIN = 0.9


def predicted_seconds(config: GemmConfig, m: int, k: int, n: int, out_itemsize: int, num_sms: int) -> float:
    """The split-K model's time for `(m, k) @ (n, k).T` under `config`: the GEMM's roofline (its flops
    at KERNEL_FLOPS; its operands read and its output written once at COPY_BYTES_PER_S) over the
    grid's wave efficiency, plus, where the kernel writes float32 sums (`raw_out`), their bytes
    written and read back."""
    mp = -(-m // config.m_multiple) * config.m_multiple
    roofline = max(2 * m * k * n / KERNEL_FLOPS, (m * k + n * k + m * n * out_itemsize) / COPY_BYTES_PER_S)
    sums = 2 * 4 * config.k_splits * mp * n if config.raw_out else 0
    return roofline / wave_efficiency(config, mp, n, num_sms) + sums / COPY_BYTES_PER_S


def with_k_splits(config: GemmConfig, m: int, k: int, n: int, out_itemsize: int, num_sms: int) -> GemmConfig:
    """`config` with K split into the number of slices (1 to MAX_K_SPLITS, dividing the k-blocks into
    slices of at least MIN_SPLIT_K_BLOCKS) that `predicted_seconds` finds fastest, the fewest of
    equals, where that beats the whole K by SPLIT_GAIN. Split, the float32 sums take twice a bf16
    tile's shared memory: the epilogue tile halves."""
    k_blocks = k // config.tile_k
    candidates = []
    for s in range(1, MAX_K_SPLITS + 1):
        if k_blocks % s or (s > 1 and k_blocks // s < MIN_SPLIT_K_BLOCKS):
            continue
        candidate = dataclasses.replace(config, k_splits=s)
        if s > 1 and not config.raw_out:
            candidate = dataclasses.replace(candidate, epi_tile_n=max(16, config.epi_tile_n // 2))
        candidates.append(candidate)
    seconds = {c.k_splits: predicted_seconds(c, m, k, n, out_itemsize, num_sms) for c in candidates}
    best = min(candidates, key=lambda c: (seconds[c.k_splits], c.k_splits))
    return best if seconds[best.k_splits] <= SPLIT_GAIN * seconds[1] else candidates[0]


def split_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int, *, block_scales: bool = False) -> GemmConfig:
    """`launch_config`'s tiles with K split where the model says so (`with_k_splits`)."""
    config = with_k_splits(_tile_config(m, n, num_sms, block_scales), m, k, n, out_itemsize, num_sms)
    config = fit_stages(config, out_itemsize, k)
    return fit_grid(config, -(-m // config.m_multiple) * config.m_multiple, n, num_sms)


# The token widths of the swapped decode schedule (its `wgmma` N): M pads up to the first that holds it.
DECODE_TOKENS = (16, 32, 64)
DECODE_GEMM = GemmConfig(swap_ab=True, epi_tile_n=16, stages=8, persistent_pipeline=True)


def decode_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int) -> GemmConfig:
    """The swapped schedule for decode-sized M (<= 64, `GemmConfig.swap_ab`): a CTA is two 64-row
    warpgroups of the weight's rows against all the tokens (padded to `DECODE_TOKENS`), no
    cluster (the token tile is small), as deep a ring as fits (the GEMM is weight-read bound), one
    pipeline across the SM's units where each gets two, K split as the model says (`with_k_splits`)."""
    if m > DECODE_TOKENS[-1]:
        raise ValueError(f"the decode schedule takes M <= {DECODE_TOKENS[-1]}, got {m}")
    tokens = next(t for t in DECODE_TOKENS if m <= t)
    config = with_k_splits(dataclasses.replace(DECODE_GEMM, tile_n=tokens), m, k, n, out_itemsize, num_sms)
    return fit_grid(fit_stages(config, out_itemsize, k), tokens, n, num_sms)


def small_m_config(
    m: int, k: int, n: int, out_itemsize: int, num_sms: int, *, block_scales: bool = False
) -> GemmConfig | None:
    """The schedule for tiles that underfill the SMs: the swapped decode schedule at M <= 64, else
    split K; None where the model keeps K whole."""
    if m <= DECODE_TOKENS[-1]:
        return decode_config(m, k, n, out_itemsize, num_sms)
    config = split_config(m, k, n, out_itemsize, num_sms, block_scales=block_scales)
    return config if config.k_splits > 1 else None


def default_config(
    m: int, k: int, n: int, out_itemsize: int, num_sms: int, *, block_scales: bool = False
) -> GemmConfig:
    """The schedule both kernels launch for `(m, k) @ (n, k).T` when none is forced (`block_scales`:
    the block-scaled one's): `small_m_config`'s where it has one, else `launch_config`'s. Measured on
    the H200 (benchmarks/NOTES.md, "H200 v3"), the swapped decode schedule read the weight 1.1-2.3x as
    fast as the 128-row CTA at M = 1-64, and the splits the model takes ran 1.1-1.6x the whole-K
    kernel at M = 128-1024."""
    small_m = small_m_config(m, k, n, out_itemsize, num_sms, block_scales=block_scales)
    return small_m or launch_config(m, k, n, out_itemsize, num_sms, block_scales=block_scales)


def overlapped_config(m: int, k: int, n: int, out_itemsize: int, num_sms: int) -> GemmConfig:
    """A schedule with overlapped promotion (measured slower, no default): `small_m_config`'s where
    there is one, else the narrow 128x128 CTA (one promoted chunk a warpgroup)."""
    config = small_m_config(m, k, n, out_itemsize, num_sms) or _tile_config(m, n, num_sms)
    if config.tile_n > PROMOTE_N:  # the wide CTA's two chunks: its 128x128 counterpart
        config = dataclasses.replace(config, tile_n=PROMOTE_N, epi_tile_n=NARROW_GEMM.epi_tile_n)
    config = dataclasses.replace(config, overlap_promotion=True)
    return fit_stages(config, out_itemsize, k)


# Where the kernel beats XLA's fp8 GEMM (cuBLASLt, float32 accumulation), by a rule calibrated on the
# H200 grid of Llama-3-8B shapes and 8192^2 at M = 128 .. 8192 (benchmarks/NOTES.md, "H200 v1"):
# - decode-sized M (one CTA row, M <= 64) stays with XLA: the kernel reads the weight at 0.7-2.4
#   TB/s there, XLA at 1.0-3.3;
# - the grid must fill the machine: under MIN_WAVES of the SMs' (clusters') slots the kernel leaves
#   SMs idle where cuBLASLt splits K (M = 128 at K x N = 14336 x 4096: 293 against 533 TFLOP/s),
#   from about one wave on it leads or ties (1.02-1.16x at M >= 1024);
# - and a last partial wave must not idle a fifth of the slots or more (MIN_WAVE_EFFICIENCY), nor
#   may N force the narrow 128x128 CTA: both cost the kernel 8-14% against XLA on the first check
#   set of other models' shapes (1024 x 3584 x 4608: 0.73 of the slots busy; N = 3584).
DECODE_M = 64
MIN_WAVES = 0.9
MIN_WAVE_EFFICIENCY = 0.8


# Where the block kernel beats XLA's block GEMM (the H200, bf16 out, DeepSeek-V3's shapes;
# benchmarks/NOTES.md, "H200 v4"): at M = 1 XLA's per-k-block GEMMs read the weight a little faster
# (3.1 against 2.8 TB/s at 7168 x 24576, 2.9 against 2.7 at 18432 x 7168, 0.8 against 0.4 at
# 7168 x 2112); from M = 4 their cost grows with M and the kernel's swapped decode schedule leads
# on the large shapes (1.4-1.6x at M = 4 and 8, 1.7-1.8x at 16); at 7168 x 2112 it ties at M = 4
# and leads 1.1x at 16 (M = 8 too noisy to read); from M = 128 it leads 3.5-6.9x. M = 2 and 3
# are not measured.
BLOCK_XLA_MAX_M = 1


def block_kernel_is_faster(m: int) -> bool:
    """Whether the rule above sends a block-scaled GEMM of M rows (as the plan buckets them) to the kernel."""
    return m > BLOCK_XLA_MAX_M


# Where the group quant kernel beats XLA's formula in `W8A8BlockFp8LinearOp.apply` (the H200, bf16
# in; benchmarks/NOTES.md, "H200 v4" and "H200 v7"): at M >= 1024 it is 1.3-2.2x XLA's fusion alone
# and the layer 1.04-1.09x; at M = 128, 256 and 512 of K = 7168 it is 1.11x, 0.98x and 1.18x the
# fusion alone; at M = 1 and 16 its launch and row padding cost the layer 2-20% (48.9 against
# 58.7 us at 1 x 18432 x 7168).
GROUP_QUANT_XLA_MAX_M = DECODE_M


def group_quant_is_faster(m: int) -> bool:
    """Whether the rule above quantizes M rows (as the plan buckets them) with the group quant kernel."""
    return m > GROUP_QUANT_XLA_MAX_M


def kernel_is_faster(m: int, k: int, n: int, num_sms: int) -> bool:
    """Whether the rule above sends the `(m, k) @ (n, k).T` GEMM (M as the plan buckets it) to the kernel."""
    if m <= DECODE_M or n % DEFAULT_GEMM.cluster_n or n % N_MULTIPLE:
        return False
    config = launch_config(m, k, n, 2, num_sms)
    slots = grid_slots(config, num_sms)
    tiles = -(-m // config.cluster_m) * (n // config.cluster_n)
    return tiles >= MIN_WAVES * slots and wave_efficiency(config, m, n, num_sms) >= MIN_WAVE_EFFICIENCY
