"""Dynamic per-token fp8 quantization for Hopper in Pallas Mosaic GPU: one pass per row.

`per_token_quant(x (M, K), scale_ub, fp8_dtype)` returns codes `(M, K)` float8_e4m3fn and scales
`(M, 1)` float32, identical to `quantization.quantize_per_token` on the same input:
    s_m = max(min(amax_m, scale_ub) / 448, 1 / (448 * 512)),   q = e4m3(clamp(x / s_m, -448, 448)).

Schedule: one warpgroup per block of rows. Each thread loads 16-byte vectors of the row straight
from global memory (coalesced across the warpgroup, no shared-memory staging: the row is read once
for its amax, kept in registers where it fits, and re-read from L1/L2 otherwise); the row's amax is
an elementwise max over the row's chunks followed by one warpgroup reduction; the scaling, clamp
and cast to e4m3 (`cvt.rn.satfinite`) run on the same registers and the codes are stored as 8-byte
vectors.

Division. The codes must equal the XLA formula's, `f32(f64(x) / f64(s))`. A float32 division in
the kernel does not give that: LLVM's NVPTX backend lowers it to an approximate instruction in the
JAX process, and LLVM also narrows `f32(f64(a) / f64(b))` back to a float32 division (measured on
an H100: 32 of 77 row scales one ulp off). The row's scale therefore divides with
`quantization.true_divide`, whose `+ 0 * a` in the divisor keeps the division in float64. A float64
division per element would cost ~10 FP64 instructions; instead each row computes
`inv = f64(1) / f64(s)` once and each element `f32(f64(x) * inv)`: the product is within 2^-52
(relative) of x / s, while a quotient of two float32 values is never closer than 2^-49 (relative)
to a float32 rounding midpoint (it would need a 25-bit significand times a 24-bit one to fit in
24 bits), so both round to the same float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from w8a8_jax import dtypes, quantization, validation

# Largest slice of a row (elements) held in registers at once: 32 float32 registers a thread.
CHUNK_ELEMENTS = 4096
WARPGROUP_THREADS = 128
# A thread's vector is one 16-byte load where K allows; the fp8 cast converts pairs, so >= 2.
MIN_VECTOR = 2


def _vector_size(k: int, itemsize: int) -> int | None:
    """Elements per thread-vector: 16 bytes if K allows it, down to 2; None if K is too ragged."""
    vec = 16 // itemsize
    while vec >= MIN_VECTOR:
        if k % (WARPGROUP_THREADS * vec) == 0:
            return vec
        vec //= 2
    return None


def supports(k: int, x_dtype, fp8_dtype) -> bool:
    """Whether the kernel takes rows of length `k` of `x_dtype` quantized to `fp8_dtype`."""
    x_dtype, fp8_dtype = np.dtype(x_dtype), np.dtype(fp8_dtype)
    return (
        fp8_dtype == np.dtype(jnp.float8_e4m3fn)
        and x_dtype in dtypes.FLOAT_DTYPES
        and k > 0
        and _vector_size(k, x_dtype.itemsize) is not None
    )


def _chunk_size(k: int, vec: int) -> int:
    """The row's slices are equal, a whole number of warpgroup-wide vectors, and at most
    CHUNK_ELEMENTS long where K allows (the largest such divisor of K)."""
    unit = WARPGROUP_THREADS * vec
    units = k // unit
    per_chunk = max((d for d in range(1, units + 1) if units % d == 0 and d * unit <= CHUNK_ELEMENTS), default=1)
    return per_chunk * unit


def _quant_kernel(x_gmem, ub_gmem, q_gmem, s_gmem, *, rows_per_block: int, vec: int):
    m, k = x_gmem.shape
    bound = float(dtypes.fp8_max(jnp.float8_e4m3fn))
    floor = float(dtypes.min_scaling_factor(jnp.float8_e4m3fn))
    size = _chunk_size(k, vec)
    starts = range(0, k, size)
    layout = plgpu.Layout.WG_STRIDED((size,), vec_size=vec)
    ub = None if ub_gmem is None else plgpu.load(ub_gmem.at[0])

    def load(row, start):
        return plgpu.load(x_gmem.at[row, pl.ds(start, size)], layout=layout).astype(jnp.float32)

    def finite_magnitude(x):  # |x|, with NaN and ±Inf counted as 0 (the amax skips them)
        magnitude = jnp.abs(x)
        return jnp.where(magnitude < jnp.inf, magnitude, 0.0)

    def quantize_row(row):
        held = load(row, 0)
        running = finite_magnitude(held)
        for start in starts[1:]:
            running = jnp.maximum(running, finite_magnitude(load(row, start)))
        amax = jnp.max(running)
        if ub is not None:
            amax = jnp.minimum(amax, ub)
        scale = jnp.maximum(quantization.true_divide(amax, bound, in_kernel=True), jnp.float32(floor))
        with jax.enable_x64(True):
            inverse = 1.0 / scale.astype(jnp.float64)
            for start in starts:
                x = held if start == 0 else load(row, start)
                quotient = (x.astype(jnp.float64) * inverse).astype(jnp.float32)
                q_gmem[row, pl.ds(start, size)] = jnp.clip(quotient, -bound, bound).astype(jnp.float8_e4m3fn)
        s_gmem[row] = scale

    block = lax.axis_index("rows")
    for i in range(rows_per_block):
        row = block * rows_per_block + i
        if m % rows_per_block:
            pl.when(row < m)(functools.partial(quantize_row, row))
        else:
            quantize_row(row)


@functools.partial(jax.jit, static_argnames=("rows_per_block", "interpret"))
def _per_token_quant(x, scale_ub, *, rows_per_block: int, interpret: bool):
    m, k = x.shape
    vec = _vector_size(k, x.dtype.itemsize)
    kernel = plgpu.kernel(
        functools.partial(_quant_kernel, rows_per_block=rows_per_block, vec=vec),
        out_type=(
            jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((m,), jnp.float32),
        ),
        grid=(pl.cdiv(m, rows_per_block),),
        grid_names=("rows",),
        # Each thread reads x and writes q and s, never the same address: no barriers are needed
        # around the loads and stores (the warpgroup reduction synchronizes itself).
        compiler_params=plgpu.CompilerParams(approx_math=False, unsafe_no_auto_barriers=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    ub = None if scale_ub is None else scale_ub.reshape(1).astype(jnp.float32)
    with jax.named_scope(f"fp8_per_token_quant_r{rows_per_block}"):
        q, scale = kernel(x, ub)
    return q, scale.reshape(m, 1)


def per_token_quant(
    x: jax.Array,
    scale_ub: jax.Array | None,
    fp8_dtype,
    *,
    rows_per_block: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token quantization, fused: codes `(M, K)` e4m3fn and scales `(M, 1)` float32.

    Args:
      x: `(M, K)` bfloat16, float16 or float32; K a multiple of 256 (`supports` says which K).
      scale_ub: `(1,)` float32 upper bound on each row's amax, or None.
      fp8_dtype: float8_e4m3fn (Hopper's format).
      rows_per_block: rows one warpgroup quantizes (tuning).
      interpret: run under Mosaic GPU interpret mode (CPU tests).
    """
    validation.check_float_input("x", x, ndim=2)
    if not dtypes.is_fp8(fp8_dtype):
        raise TypeError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    if scale_ub is not None:
        scale_ub = validation.per_tensor_scale("scale_ub", scale_ub)
    m, k = x.shape
    if not supports(k, x.dtype, fp8_dtype):
        raise ValueError(
            f"the per-token quant kernel takes float8_e4m3fn codes of rows whose K divides into 128-thread "
            f"vectors, got K={k}, {np.dtype(x.dtype).name} -> {np.dtype(fp8_dtype).name}"
        )
    if m == 0:
        return jnp.zeros((0, k), fp8_dtype), jnp.zeros((0, 1), jnp.float32)
    return _per_token_quant(x, scale_ub, rows_per_block=rows_per_block, interpret=interpret)
