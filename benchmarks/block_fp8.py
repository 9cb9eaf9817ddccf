"""Block-scaled fp8 GEMMs (DeepSeek-V3) on one GPU: the XLA block path and its variants, XLA bf16 and
per-channel fp8, and torch._scaled_mm's blockwise GEMM, in one process on the same operands.

Operands: activations `(M, K)` fp8 e4m3fn with `scale_a (M, ceil(K/128))` (1x128 groups per token,
from `per_token_group_quant_fp8` of a bf16 activation) and weights `(N, K)` fp8 with
`scale_b (ceil(N/128), ceil(K/128))` (128x128 blocks, `quantization.quantize_block_weight`), bf16
out, at M in {1, 16, 128, 1024, 4096} on DeepSeek-V3's (K, N): 7168x2112, 7168x24576, 1536x24576,
16384x7168, 7168x18432, 18432x7168. Every path gets the same codes: the bf16 paths their bf16 copy,
the per-channel paths per-row and per-column scales. Rows (paths):

  xla_block             `block_scaled_mm.xla_block_w8a8_scaled_mm` as shipped: per-k-block fp8 dots,
                        float32 partial products of at most `PARTIAL_PRODUCT_BYTES`, in row chunks
  xla_block_budget_B    the same package function traced with `PARTIAL_PRODUCT_BYTES = B` (256 MiB,
                        1 GiB, 4 GiB; `--budgets`); where it gives the program `xla_block` or an
                        earlier budget already runs, the row says `same_as` and is not timed again
  xla_block_scan        written here: a `lax.scan` over the k-blocks, one fp8 dot of K=128 a step,
                        scaled and added into a float32 `(M, N)` accumulator
  xla_block_dequant_x6  written here: both operands dequantized to float32 (codes times their
                        block scales), one float32 GEMM by XLA's BF16_BF16_F32_X6 algorithm (each
                        operand split into three bf16 parts, six bf16 GEMMs: float32 accuracy)
  xla_block_dequant_x3  the same with BF16_BF16_F32_X3 (two parts, three GEMMs: ~16 bits)
  block_fp8_matmul      the public `w8a8_block_fp8_matmul`, timed only where its plan picks another
                        GEMM than the XLA path (otherwise `same_as: xla_block`, with the plan's reason)
  xla_bf16              bf16 `dot_general`, bf16 out (cuBLAS accumulates bf16 GEMMs in float32)
  xla_per_channel_fp8   `xla_per_token_w8a8_scaled_mm` with `(M, 1)` and `(N, 1)` scales
  torch_blockwise       `torch._scaled_mm` with 1x128 activation and 128x128 weight scales (below)
  torch_rowwise_fp8     `torch._scaled_mm` with `(M, 1)` and `(1, N)` scales
  torch_bf16            `torch.mm` in bf16

torch's blockwise call (torch 2.11 built with CUDA >= 12.9, on sm90): `torch._scaled_mm(a, w.t(),
scale_a, scale_b, out_dtype=torch.bfloat16)`, `a (M, K)` row-major, `w.t()` the `(K, N)`
column-major view of the `(N, K)` weight, K and N multiples of 16. torch picks the scaling from the
scales' shapes and strides (`get_joint_scaling` in ATen's `ScaledBlas.cpp`): 1x128 for `a` needs
`scale_a (M, ceil(K/128))` outer-dim-major, strides `(1, M)`; 128x128 for the weight needs
`scale_b (ceil(K/128), ceil(N/128))` whose transpose is row-major, i.e. `sb.t()` of the `(NB, KB)`
block scales. cuBLASLt reads that buffer with its k-blocks padded to `L4 = round_up(KB, 4)` (equal
to KB at every DeepSeek shape), so the first form pads the buffer to L4 columns. Should a form
raise or disagree with the float64 reference, the next is tried: the unpadded buffer, the rows
padded to a multiple of 4, then `torch.nn.functional.scaled_mm` with `ScalingType.BlockWise1x128` /
`BlockWise128x128`. Every attempt is recorded, and a form that gave wrong numbers once is never
timed.

How it is timed (`timing.py`, shared with `gpu_kernels.py`): R distinct operand sets per row (8 at
M <= 128, 4 above; no two timed calls share an operand, so XLA cannot merge them and no weight
stays in L2), one jitted program of R calls compiled ahead of time (its compile seconds and
`memory_analysis()` are recorded: temp bytes is the device memory the program needs beside its
operands and outputs), one warm-up, then the median of `--reps` timed loops divided by R, by wall
clock (dispatch and host round trip included) and, beside it, by CUPTI (the kernels' GPU time).
torch is timed by wall clock over the same R calls back to back (and by CUDA events beside it), on
the JAX arrays themselves, shared through DLPack (fp8 as a uint8 view, `.view(float8_e4m3fn)`).
Every figure is set against the H200's peaks: TFLOP/s and its fraction of 1979 (fp8 dense; 989 for
bf16), and at M <= 128 the bytes that must move (weights, activations, scales, output) per second
against 4.8 TB/s; a figure above a peak is flagged as a measurement error.

Correctness first, in the same run: every path on two shapes (12x640x320, with a partial weight
block and 5 k-blocks, and 128x7168x2112) against a float64 NumPy reference (codes times scales,
summed per k-block), max error relative to max |ref| (also xla_block under a budget that splits
those rows into 3 chunks); a path that gives wrong numbers there is not timed anywhere. Then in
every row, before a path is timed, its output for the first operand set is checked on three rows
(first, middle, last) and every column against the float64 reference.

    python benchmarks/block_fp8.py [--quick] [--ms M ...] [--kn K N ...] [--reps N] [--paths NAME ...]
                                   [--budgets 256MiB 1GiB 4GiB] [--check M K N] [--time-budget S]
                                   [--json PATH]

`--quick`: two shapes at M in {1, 128, 4096}. The full run is sized for about 8 minutes on an H200,
compiles included; rows left when `--time-budget` (default 420 s, checks included) runs out are
recorded as skipped. Prints a short table last; the full results go to `$OUT/block_fp8.json` (or
`--json`), rewritten after every row.
"""

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference
import timing

import w8a8_jax
from w8a8_jax import block_scaled_mm, dispatch, layout, platform, quantization, scaled_mm
from w8a8_jax import scheme as scheme_lib

try:
    import torch
except ImportError:  # the torch rows are then recorded as unavailable
    torch = None

BLOCK = (128, 128)
FP8 = jnp.float8_e4m3fn
OUT = jnp.bfloat16
M_VALUES = (1, 16, 128, 1024, 4096)
KN = ((7168, 2112), (7168, 24576), (1536, 24576), (16384, 7168), (7168, 18432), (18432, 7168))
QUICK_MS = (1, 128, 4096)
QUICK_KN = ((7168, 2112), (7168, 24576))
CHECK_SHAPES = ((12, 640, 320), (128, 7168, 2112))  # (M, K, N)
BUDGETS = ("256MiB", "1GiB", "4GiB")
FP8_PEAK_TFLOPS = 1979.0  # H200 dense fp8
BF16_PEAK_TFLOPS = 989.0  # H200 dense bf16
HBM_TBPS = 4.8
SMALL_M = 128  # rows at or below this are also reported in bytes/s
R_SMALL, R_LARGE = 8, 4  # distinct operand sets per timed loop, at M <= SMALL_M and above

BF16_PATHS = ("xla_bf16", "torch_bf16")
TABLE_PATHS = (
    "xla_block",
    "xla_block_scan",
    "xla_block_dequant_x6",
    "xla_block_dequant_x3",
    "xla_bf16",
    "xla_per_channel_fp8",
    "torch_blockwise",
    "torch_rowwise_fp8",
    "torch_bf16",
)


# --- sizes -----------------------------------------------------------------------------------------


def parse_bytes(text) -> int:
    """'256MiB', '1GiB', '4096' -> bytes."""
    text = str(text).strip()
    for suffix, mult in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def bytes_label(nbytes: int) -> str:
    for suffix, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{suffix}"
    return f"{nbytes}B"


def kblocks(k: int) -> int:
    return layout.num_blocks(k, BLOCK[1])


def min_bytes(path: str, m: int, k: int, n: int) -> int:
    """Bytes a path must move at least: its operands once, its scales, its bf16 output."""
    out = 2 * m * n
    if path in BF16_PATHS:
        return 2 * (m * k + n * k) + out
    if path in ("xla_per_channel_fp8", "torch_rowwise_fp8"):
        return m * k + n * k + 4 * (m + n) + out
    return m * k + n * k + 4 * (m * kblocks(k) + layout.num_blocks(n, BLOCK[0]) * kblocks(k)) + out


def peak_tflops(path: str) -> float:
    return BF16_PEAK_TFLOPS if path in BF16_PATHS else FP8_PEAK_TFLOPS


# --- operands --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n", "k"))
def _weight_set(key, n, k):
    """One layer's weight: block codes and scales, the codes in bf16, and (N, 1) per-channel scales."""
    w = jax.random.normal(key, (n, k), jnp.float32) * 0.02
    codes, scale = quantization.quantize_block_weight(w, BLOCK, FP8)
    per_channel = jnp.repeat(jnp.max(scale, axis=1), BLOCK[0])[:n][:, None]
    return dict(w=codes, sb=scale, wb=codes.astype(jnp.bfloat16), sb_row=per_channel)


@functools.partial(jax.jit, static_argnames=("m", "k"))
def _activation_set(key, m, k):
    """One activation: per-token-group codes and scales, the codes in bf16, and (M, 1) scales."""
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    codes, scale = w8a8_jax.per_token_group_quant_fp8(x, BLOCK[1], fp8_dtype=FP8)
    return dict(q=codes, sa=scale, xb=codes.astype(jnp.bfloat16), sa_row=jnp.max(scale, axis=1, keepdims=True))


def make_weights(key, k, n, count):
    return [jax.block_until_ready(_weight_set(kk, n=n, k=k)) for kk in jax.random.split(key, count)]


def make_activations(key, m, k, count):
    return [jax.block_until_ready(_activation_set(kk, m=m, k=k)) for kk in jax.random.split(key, count)]


# --- the float64 reference -------------------------------------------------------------------------


# Every e4m3fn code's value by its byte, in float64 (a table look-up is 4x faster than converting).
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def kblock_codes(codes) -> np.ndarray:
    """fp8 e4m3fn codes `(R, K)` -> their float64 values `(R, KB * 128)`, zero-padded to whole k-blocks."""
    codes = np.asarray(codes)
    if codes.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise TypeError(f"expected float8_e4m3fn codes, got {codes.dtype}")
    r, k = codes.shape
    raw = np.zeros((r, kblocks(k) * BLOCK[1]), np.uint8)  # byte 0 is +0.0
    raw[:, :k] = codes.view(np.uint8)
    return _E4M3_VALUES[raw]


def kblock_products(q_rows, weight_values) -> np.ndarray:
    """float64 `(R, KB, N)`: each k-block's product of the activation codes `q_rows (R, K)` with the
    weight, given as `kblock_codes(weight)` (exact: fp8 codes and sums of 128 of their products fit
    in float64)."""
    a = kblock_codes(q_rows)
    (r, width), n, bk = a.shape, weight_values.shape[0], BLOCK[1]
    out = np.empty((r, width // bk, n))
    for b in range(width // bk):
        cols = slice(b * bk, (b + 1) * bk)
        out[:, b, :] = a[:, cols] @ weight_values[:, cols].T
    return out


def references(products, sa_rows, sb, sa_row_rows, sb_row) -> dict:
    """The float64 outputs each kind of path stands for, on the rows `products` was taken of:
    'block' (1x128 and 128x128 scales), 'per_channel' ((M, 1) and (N, 1)) and 'bf16' (the codes)."""
    n = products.shape[2]
    column_scale = np.repeat(np.asarray(sb, np.float64), BLOCK[0], axis=0)[:n].T  # (KB, N)
    block = np.einsum("rbn,rb,bn->rn", products, np.asarray(sa_rows, np.float64), column_scale)
    plain = products.sum(axis=1)
    per_channel = plain * np.asarray(sa_row_rows, np.float64).reshape(-1, 1) * np.asarray(sb_row, np.float64).T
    return dict(block=block, per_channel=per_channel, bf16=plain)


def block_reference(qinput, weight, scale_a, scale_b) -> np.ndarray:
    """float64 block-scaled GEMM of the whole `(M, K) x (N, K)` (codes times scales, per k-block)."""
    products = kblock_products(qinput, kblock_codes(weight))
    m = products.shape[0]
    return references(products, scale_a, scale_b, np.ones((m, 1)), np.ones((weight.shape[0], 1)))["block"]


def check_output(out, ref, k) -> dict:
    """`out` against the float64 `ref`: max error relative to max |ref|, within the bf16-output GEMM
    tolerance (`reference.gemm_tolerance`, the fp8 tensor cores' floor on a GPU). A wrong scale, a
    transposed scale layout or a dropped k-block moves it by orders of magnitude more."""
    out = np.asarray(out, np.float64)
    tol = reference.gemm_tolerance(k, OUT)
    if out.shape != ref.shape:
        return dict(err=None, tol=tol, ok=False, error=f"shape {out.shape}, expected {ref.shape}")
    finite = bool(np.isfinite(out).all())
    err = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    return dict(err=err, tol=tol, ok=bool(finite and err <= tol), **({} if finite else {"error": "non-finite output"}))


def kind_of(path: str) -> str:
    if path in BF16_PATHS:
        return "bf16"
    if path in ("xla_per_channel_fp8", "torch_rowwise_fp8"):
        return "per_channel"
    return "block"


# --- the JAX paths ---------------------------------------------------------------------------------


@contextlib.contextmanager
def partial_product_budget(nbytes: int):
    """`block_scaled_mm.PARTIAL_PRODUCT_BYTES` set to `nbytes` for the duration (trace time)."""
    saved = block_scaled_mm.PARTIAL_PRODUCT_BYTES
    block_scaled_mm.PARTIAL_PRODUCT_BYTES = nbytes
    try:
        yield
    finally:
        block_scaled_mm.PARTIAL_PRODUCT_BYTES = saved


def xla_block_with_budget(nbytes: int):
    """The package's XLA block GEMM with its partial-product budget set to `nbytes`.

    Reimplements nothing: it validates with `check_block_gemm_operands` and traces the body of the
    jitted `_xla_block` (its `__wrapped__`) inline while `PARTIAL_PRODUCT_BYTES` is patched. The
    jitted `_xla_block` reads the constant when it traces and caches that trace, so calling it would
    reuse whichever budget traced first; the unjitted body has no cache to go stale.
    """
    body = block_scaled_mm._xla_block.__wrapped__

    def fn(qinput, weight, scale_a, scale_b):
        scale_a, scale_b, block_size, _, out_dtype = block_scaled_mm.check_block_gemm_operands(
            qinput, weight, scale_a, scale_b, BLOCK, None, OUT
        )
        with partial_product_budget(nbytes):
            return body(qinput, weight, scale_a, scale_b, None, block_size=block_size, out_dtype=out_dtype)

    return fn


def xla_block(qinput, weight, scale_a, scale_b):
    return block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, None, OUT)


def xla_block_scan(qinput, weight, scale_a, scale_b):
    """The block GEMM as a `lax.scan` over k-blocks: each step one fp8 dot of K=128 (float32
    accumulation; `scaled_mm._fp8_dot`, which writes a matrix-vector product as float32 products
    summed), scaled by `scale_a[:, kb] x scale_b[n // 128, kb]` and added into a float32 `(M, N)`.
    The k-major views of the codes are copies XLA makes once per call."""
    (m, k), n = qinput.shape, weight.shape[0]
    (bn, bk), blocks = BLOCK, kblocks(k)
    pad = blocks * bk - k
    if pad:  # zero codes add nothing to the last block's product
        qinput, weight = (jnp.pad(x, ((0, 0), (0, pad))) for x in (qinput, weight))
    a = qinput.reshape(m, blocks, bk).transpose(1, 0, 2)  # (KB, M, bk)
    w = weight.reshape(n, blocks, bk).transpose(1, 0, 2)  # (KB, N, bk)
    column_scale = jnp.repeat(scale_b, bn, axis=0)[:n].T  # (KB, N)

    def step(acc, xs):
        a_k, w_k, sa_k, sb_k = xs
        return acc + scaled_mm._fp8_dot(a_k, w_k) * (sa_k[:, None] * sb_k[None, :]), None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (a, w, scale_a.T, column_scale))
    return acc.astype(OUT)


def xla_block_dequant(algorithm):
    """The block GEMM as one float32 GEMM of the dequantized operands, by `algorithm` (a
    `DotAlgorithmPreset` that splits float32 into bf16 parts)."""

    def fn(qinput, weight, scale_a, scale_b):
        a = quantization.dequantize_weight(qinput, scale_a, (1, BLOCK[1]))
        w = quantization.dequantize_weight(weight, scale_b, BLOCK)
        return jax.lax.dot_general(
            a, w, layout.CONTRACT_K, precision=algorithm, preferred_element_type=jnp.float32
        ).astype(OUT)

    return fn


def block_fp8_matmul(qinput, weight, scale_a, scale_b):
    return w8a8_jax.w8a8_block_fp8_matmul(qinput, weight, scale_a, scale_b, list(BLOCK), OUT)


def block_plan(m, k, n) -> dispatch.Plan:
    """The plan `w8a8_block_fp8_matmul` follows at this shape."""
    return dispatch.plan(
        scheme_lib.Fp8Scheme("block", block_size=BLOCK),
        input_shape=(m, k),
        input_dtype=jnp.dtype(FP8),
        weight_shape=(n, k),
        weight_dtype=jnp.dtype(FP8),
        out_dtype=jnp.dtype(OUT),
        kernel=platform.fused_kernel(),
    )


def xla_bf16(x, w):
    return jax.lax.dot_general(x, w, layout.CONTRACT_K, preferred_element_type=OUT)


def xla_per_channel_fp8(qinput, weight, scale_a, scale_b):
    return w8a8_jax.xla_per_token_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, None, OUT)


def _block_operands(a, w):
    return (a["q"], w["w"], a["sa"], w["sb"])


def jax_paths(budgets) -> dict:
    """name -> (operands of an (activation, weight) set, fn)."""
    paths = {"xla_block": (_block_operands, xla_block)}
    for nbytes in budgets:
        paths[f"xla_block_budget_{bytes_label(nbytes)}"] = (_block_operands, xla_block_with_budget(nbytes))
    paths["xla_block_scan"] = (_block_operands, xla_block_scan)
    paths["xla_block_dequant_x6"] = (_block_operands, xla_block_dequant(jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6))
    paths["xla_block_dequant_x3"] = (_block_operands, xla_block_dequant(jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3))
    paths["block_fp8_matmul"] = (_block_operands, block_fp8_matmul)
    paths["xla_bf16"] = (lambda a, w: (a["xb"], w["wb"]), xla_bf16)
    paths["xla_per_channel_fp8"] = (lambda a, w: (a["q"], w["w"], a["sa_row"], w["sb_row"]), xla_per_channel_fp8)
    return paths


def program_signature(fn, operands) -> str:
    """The traced program of one call, to tell which budgets give the same program."""
    return str(jax.make_jaxpr(fn)(*operands))


def same_program_as(budgets, operands) -> dict:
    """budget row name -> the earlier row ('xla_block' or a smaller budget) whose program it repeats."""
    seen = {program_signature(xla_block_with_budget(block_scaled_mm.PARTIAL_PRODUCT_BYTES), operands): "xla_block"}
    same = {}
    for nbytes in budgets:
        name = f"xla_block_budget_{bytes_label(nbytes)}"
        sig = program_signature(xla_block_with_budget(nbytes), operands)
        if sig in seen:
            same[name] = seen[sig]
        else:
            seen[sig] = name
    return same


# --- the torch paths -------------------------------------------------------------------------------


def torch_set(jax_set) -> dict:
    """The arrays of one JAX operand set as torch tensors on the same memory (DLPack)."""
    return {name: timing.to_torch(x) for name, x in jax_set.items()}


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def blockwise_forms(m: int, kb: int) -> list:
    """torch blockwise call forms to try, in order: (api, pad the k-blocks of scale_b's buffer to a
    multiple of 4, pad the rows to a multiple of 4). Forms equal at this shape appear once."""
    forms = [("scaled_mm", True, False)]
    if kb % 4:
        forms.append(("scaled_mm", False, False))
    if m % 4:
        forms.append(("scaled_mm", True, True))
    forms.append(("functional", True, False))
    if m % 4:
        forms.append(("functional", True, True))
    return forms


def form_key(form, m: int, kb: int) -> str:
    """The layout a form gives at this shape, as a name: padding that changes nothing is left out."""
    api, pad_kb, pad_rows = form
    kb_layout = ("+kblocks_pad4" if pad_kb else "+kblocks_unpadded") if kb % 4 else ""
    return api + kb_layout + ("+rows_pad4" if pad_rows and m % 4 else "")


def _strided(shape, strides, like):
    """A float32 view of `shape` and `strides` into ones, with room to spare past its last element
    (so a layout that a library reads further than we meant reads ours, never foreign memory)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    storage = torch.ones(round_up(extent, 4) * 4 + 256, dtype=torch.float32, device=like.device)
    return storage.as_strided(shape, strides)


def blockwise_scales(sa, sb, pad_kb: bool, functional: bool):
    """torch's blockwise scale layouts from `sa (M, KB)` and `sb (NB, KB)` (row-major float32).

    scale_a: `(M, KB)`, outer-dim-major (strides exactly `(1, M)`, also at M = 1). scale_b: the
    transpose of a row-major `(NB, L4)` buffer holding `sb` in its first KB columns (L4 = KB rounded
    up to a multiple of 4 with `pad_kb`, else KB); `torch._scaled_mm` takes its `(KB, NB)` view, the
    functional API the whole `(L4, NB)`.
    """
    m, kb = sa.shape
    nb = sb.shape[0]
    scale_a = _strided((m, kb), (1, m), sa)
    scale_a.copy_(sa)
    l4 = round_up(kb, 4) if pad_kb else kb
    buffer = _strided((nb, l4), (l4, 1), sb)
    buffer[:, :kb] = sb
    scale_b = buffer.t() if functional else buffer[:, :kb].t()
    return scale_a, scale_b


def blockwise_prepare(form, t_act, t_wt):
    """The arguments of one blockwise call in `form`, made before any timing."""
    api, pad_kb, pad_rows = form
    q, sa = t_act["q"], t_act["sa"]
    m = q.shape[0]
    if pad_rows and m % 4:
        rows = round_up(m, 4)
        q = torch.cat([q.view(torch.uint8), q.new_zeros((rows - m, q.shape[1]), dtype=torch.uint8)]).view(q.dtype)
        sa = torch.cat([sa, sa.new_ones((rows - m, sa.shape[1]))])
    scale_a, scale_b = blockwise_scales(sa, t_wt["sb"], pad_kb, api == "functional")
    return (api, q, t_wt["w"].t(), scale_a, scale_b, m)


def blockwise_call(args):
    api, a, b, scale_a, scale_b, m = args
    if api == "functional":
        from torch.nn.functional import ScalingType, scaled_mm

        out = scaled_mm(
            a,
            b,
            scale_a,
            ScalingType.BlockWise1x128,
            scale_b,
            ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        )
    else:
        out = torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16)
    return out[:m] if out.shape[0] != m else out


def rowwise_prepare(t_act, t_wt):
    return (t_act["q"], t_wt["w"].t(), t_act["sa_row"].contiguous(), t_wt["sb_row"].reshape(1, -1).contiguous())


def rowwise_call(args):
    a, b, scale_a, scale_b = args
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16)


def bf16_prepare(t_act, t_wt):
    return (t_act["xb"], t_wt["wb"].t())


def bf16_call(args):
    return torch.mm(*args)


def torch_rows(out, rows) -> np.ndarray:
    return out[list(rows)].float().cpu().numpy()


def select_blockwise_form(m, kb, t_act, t_wt, ref, k, rows, bad_forms, attempts) -> tuple:
    """The first blockwise form that runs and matches `ref` on `rows`: `(form, None)`, or
    `(None, error)`. Forms that ran but disagreed join `bad_forms` and are never timed."""
    last = "no form left to try"
    for form in blockwise_forms(m, kb):
        key = form_key(form, m, kb)
        if key in bad_forms:
            attempts.append(dict(form=key, skipped="gave wrong numbers before"))
            continue
        try:
            out = blockwise_call(blockwise_prepare(form, t_act, t_wt))
            timing.torch_sync(out.device)
            check = check_output(torch_rows(out, rows), ref, k)
        except Exception as err:  # a refused form is recorded; the next one is tried
            last = f"{type(err).__name__}: {str(err)[:400]}"
            attempts.append(dict(form=key, error=last))
            continue
        attempts.append(dict(form=key, **check))
        if check["ok"]:
            return form, None
        bad_forms.add(key)
        last = f"{key}: error {check['err']} > tol {check['tol']}"
    return None, last


# --- correctness first -----------------------------------------------------------------------------


def host_rows(jax_set, rows) -> dict:
    return {name: np.asarray(x[np.asarray(rows)]) for name, x in jax_set.items()}


def run_checks(results, check_shapes, budgets, torch_state):
    """Every path on each check shape against the float64 reference, all rows and columns.
    Returns the set of JAX paths that gave wrong numbers (never timed)."""
    failed = set()
    key = jax.random.key(7)
    for m, k, n in check_shapes:
        key, ka, kw = jax.random.split(key, 3)
        act, wt = make_activations(ka, m, k, 1)[0], make_weights(kw, k, n, 1)[0]
        a = {name: np.asarray(x) for name, x in act.items()}
        w = {name: np.asarray(x) for name, x in wt.items()}
        refs = references(kblock_products(a["q"], kblock_codes(w["w"])), a["sa"], w["sb"], a["sa_row"], w["sb_row"])
        paths = jax_paths(budgets)
        # A budget small enough to chunk these rows too: the chunked program, padding rows included.
        chunk_rows = max(1, (m + 2) // 3)
        paths["xla_block_chunked_check"] = (_block_operands, xla_block_with_budget(chunk_rows * kblocks(k) * n * 4))
        for name, (operands, fn) in paths.items():
            entry = dict(kind="check", path=name, m=m, k=k, n=n)
            try:
                out = jax.jit(fn)(*operands(act, wt))
                entry.update(check_output(out, refs[kind_of(name)], k))
            except Exception as err:
                entry.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
            if not entry["ok"] and "err" in entry and entry["err"] is not None:
                failed.add(name)
            results["checks"].append(entry)
            print_check(entry)
        if torch_state["error"]:
            for name in ("torch_blockwise", "torch_rowwise_fp8", "torch_bf16"):
                results["checks"].append(
                    dict(kind="check", path=name, m=m, k=k, n=n, ok=None, unavailable=torch_state["error"])
                )
            continue
        try:
            t_act, t_wt = torch_set(act), torch_set(wt)
        except Exception as err:
            torch_state["error"] = f"DLPack to torch failed: {type(err).__name__}: {str(err)[:300]}"
            continue
        rows = list(range(m))
        attempts = []
        form, error = select_blockwise_form(
            m, kblocks(k), t_act, t_wt, refs["block"], k, rows, torch_state["bad_forms"], attempts
        )
        entry = dict(kind="check", path="torch_blockwise", m=m, k=k, n=n, attempts=attempts)
        wrong = [a["form"] for a in attempts if a.get("ok") is False]
        if form is not None:
            entry.update(attempts[-1], form=form_key(form, m, kblocks(k)))
        else:
            entry.update(ok=False, error=error)
        if wrong:
            entry["wrong_forms"] = wrong
        results["checks"].append(entry)
        print_check(entry)
        for name, prepare, call in (
            ("torch_rowwise_fp8", rowwise_prepare, rowwise_call),
            ("torch_bf16", bf16_prepare, bf16_call),
        ):
            entry = dict(kind="check", path=name, m=m, k=k, n=n)
            try:
                out = call(prepare(t_act, t_wt))
                timing.torch_sync(out.device)
                entry.update(check_output(torch_rows(out, rows), refs[kind_of(name)], k))
            except Exception as err:
                entry.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
            if not entry["ok"] and entry.get("err") is not None:
                torch_state["failed"].add(name)
            results["checks"].append(entry)
            print_check(entry)
    return failed


def print_check(entry):
    if entry.get("unavailable"):
        status = f"unavailable ({entry['unavailable']})"
    elif entry.get("err") is not None:
        status = f"err {entry['err']:.3g} tol {entry['tol']:.3g} {'OK' if entry['ok'] else 'FAIL'}"
    else:
        status = f"FAIL ({entry.get('error')})"
    form = f" [{entry['form']}]" if entry.get("form") else ""
    print(f"check {entry['path']}{form} {entry['m']}x{entry['k']}x{entry['n']}: {status}", flush=True)


# --- timing ----------------------------------------------------------------------------------------


def figures(path, seconds, m, k, n) -> dict:
    """TFLOP/s and bytes/s of a time, against the peaks; flags a figure above one."""
    if not seconds:
        return {}
    tflops = 2.0 * m * k * n / seconds / 1e12
    out = dict(tflops=tflops, frac_peak=tflops / peak_tflops(path))
    flags = []
    if out["frac_peak"] > 1.0:
        flags.append(f"{tflops:.0f} TFLOP/s is above the {peak_tflops(path):.0f} peak")
    if m <= SMALL_M:
        tbps = min_bytes(path, m, k, n) / seconds / 1e12
        out.update(tbps=tbps, frac_hbm=tbps / HBM_TBPS)
        if tbps > HBM_TBPS:
            flags.append(f"{tbps:.2f} TB/s is above the {HBM_TBPS} TB/s HBM peak")
    if flags:
        out["above_peak"] = flags
    return out


def memory_of(compiled) -> dict:
    try:
        stats = compiled.memory_analysis()
        return dict(
            temp_bytes=int(stats.temp_size_in_bytes),
            argument_bytes=int(stats.argument_size_in_bytes),
            output_bytes=int(stats.output_size_in_bytes),
        )
    except Exception as err:  # not every backend reports it
        return dict(memory_error=f"{type(err).__name__}: {str(err)[:200]}")


def time_jax_path(fn, inputs, ref, k, rows, reps, cupti_state) -> dict:
    """Compile the R-call program, check set 0's rows against `ref`, then time it by wall clock
    and CUPTI. A path that fails its check is not timed."""
    compiled, compile_s = timing.compile_looped(lambda operands: fn(*operands), inputs)
    entry = dict(compile_s=compile_s, r=len(inputs), **memory_of(compiled))
    outs = jax.block_until_ready(compiled(inputs))
    check = check_output(np.asarray(outs[0][np.asarray(rows)]), ref, k)
    del outs
    entry["check"] = check
    if not check["ok"]:
        entry["status"] = "failed_check"
        return entry
    entry["wall_s"] = timing.wall_seconds(compiled, inputs, reps)
    if cupti_state["error"] is None:
        try:
            entry["cupti_s"] = timing.kernel_seconds(compiled, inputs, reps)
        except Exception as err:  # the wall-clock figure stands without it
            entry["cupti_s"] = None
            if "not supported" in str(err):
                cupti_state["error"] = str(err)
            entry["cupti_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    else:
        entry["cupti_s"] = None
    entry["status"] = "ok"
    return entry


def time_torch_path(call, inputs, ref, k, rows, reps, device) -> dict:
    out = call(inputs[0])
    timing.torch_sync(device)
    check = check_output(torch_rows(out, rows), ref, k)
    del out
    entry = dict(r=len(inputs), check=check)
    if not check["ok"]:
        entry["status"] = "failed_check"
        return entry
    entry["wall_s"] = timing.time_torch_wall(call, inputs, reps, device)
    entry["events_s"] = timing.time_torch(call, inputs, reps) if torch.device(device).type == "cuda" else None
    entry["status"] = "ok"
    return entry


def wanted(args, name: str) -> bool:
    """Whether `--paths` keeps this row (xla_block always runs: every ratio is taken against it)."""
    if not args.paths or name == "xla_block":
        return True
    return any(name == p or (p == "xla_block_budget" and name.startswith("xla_block_budget_")) for p in args.paths)


def sample_rows(m: int) -> list:
    return sorted({0, m // 2, m - 1})


def bench(results, ms, kns, args, budgets, failed_jax, torch_state, deadline, save):
    cupti_state = {"error": None}
    key = jax.random.key(11)
    for k, n in kns:
        if time.perf_counter() > deadline:
            results["skipped"] += [dict(m=m, k=k, n=n, why="time budget") for m in ms]
            continue
        key, kw, ka = jax.random.split(key, 3)
        try:
            bench_shape(results, k, n, kw, ka, ms, args, budgets, failed_jax, torch_state, cupti_state, deadline, save)
        except Exception as err:  # one shape's failure (memory, say) is recorded; the others still run
            results["errors"].append(dict(k=k, n=n, error=f"{type(err).__name__}: {str(err)[:400]}"))
            print(f"shape {k}x{n} failed: {type(err).__name__}: {str(err)[:400]}", flush=True)
    results["cupti"] = cupti_state["error"] or "ok"


def bench_shape(results, k, n, kw, ka, ms, args, budgets, failed_jax, torch_state, cupti_state, deadline, save):
    """Every M of one (K, N): the weights are made once (R sets), the activations per M."""
    count = max(args.r_small if m <= SMALL_M else args.r_large for m in ms)
    weights = make_weights(kw, k, n, count)
    w0 = dict(sb=np.asarray(weights[0]["sb"]), sb_row=np.asarray(weights[0]["sb_row"]))
    w0["blocks"] = kblock_codes(np.asarray(weights[0]["w"]))  # for the float64 reference rows
    t_weights = None
    if not torch_state["error"]:
        try:
            t_weights = [torch_set(w) for w in weights]
        except Exception as err:
            torch_state["error"] = f"DLPack to torch failed: {type(err).__name__}: {str(err)[:300]}"
    for m in ms:
        if time.perf_counter() > deadline:
            results["skipped"].append(dict(m=m, k=k, n=n, why="time budget"))
            continue
        try:
            row_start = time.perf_counter()
            r = args.r_small if m <= SMALL_M else args.r_large
            acts = make_activations(jax.random.fold_in(ka, m), m, k, r)
            pairs = list(zip(acts, weights[:r]))
            rows = sample_rows(m)
            a0 = host_rows(acts[0], rows)
            refs = references(kblock_products(a0["q"], w0["blocks"]), a0["sa"], w0["sb"], a0["sa_row"], w0["sb_row"])
            row = dict(kind="gemm", m=m, k=k, n=n, r=r, flops=2.0 * m * k * n, paths={})
            paths = {name: path for name, path in jax_paths(budgets).items() if wanted(args, name)}
            same = same_program_as(budgets, _block_operands(*pairs[0]))
            plan = block_plan(m, k, n)
            if plan.gemm == dispatch.XLA_BLOCK_GEMM:
                same["block_fp8_matmul"] = "xla_block"
            for name, (operands, fn) in paths.items():
                if name in same:
                    entry = dict(status="same_as", same_as=same[name])
                    if name == "block_fp8_matmul":
                        entry["plan"] = plan.reason
                elif name in failed_jax:
                    entry = dict(status="refused", why="failed the float64 check")
                elif time.perf_counter() > deadline:
                    entry = dict(status="skipped", why="time budget")
                else:
                    try:
                        entry = time_jax_path(
                            fn, [operands(a, w) for a, w in pairs], refs[kind_of(name)], k, rows, args.reps, cupti_state
                        )
                    except Exception as err:  # a failing variant is reported, not fatal
                        entry = dict(status="error", error=f"{type(err).__name__}: {str(err)[:400]}")
                entry.update(figures_of(name, entry, m, k, n))
                row["paths"][name] = entry
                print_path(row, name)
            bench_torch(row, pairs, t_weights[:r] if t_weights else None, refs, rows, args, torch_state, deadline)
            row["ratios"] = ratios(row)
            row["row_s"] = time.perf_counter() - row_start
            results["rows"].append(row)
            print(
                f"row {m}x{k}x{n} done in {row['row_s']:.1f} s ({time.perf_counter() - results['start']:.0f} s so far)",
                flush=True,
            )
            save()
        except Exception as err:  # this row is recorded as failed; the next M still runs
            results["errors"].append(dict(m=m, k=k, n=n, error=f"{type(err).__name__}: {str(err)[:400]}"))
            print(f"row {m}x{k}x{n} failed: {type(err).__name__}: {str(err)[:400]}", flush=True)
    del weights, t_weights


def bench_torch(row, pairs, t_weights, refs, rows, args, torch_state, deadline):
    m, k, n = row["m"], row["k"], row["n"]
    names = [name for name in ("torch_blockwise", "torch_rowwise_fp8", "torch_bf16") if wanted(args, name)]
    if torch_state["error"] or t_weights is None:
        for name in names:
            row["paths"][name] = dict(status="unavailable", why=torch_state["error"] or "no torch weights")
            print_path(row, name)
        return
    try:
        t_acts = [torch_set(a) for a, _ in pairs]
    except Exception as err:
        for name in names:
            row["paths"][name] = dict(status="error", error=f"DLPack: {type(err).__name__}: {str(err)[:300]}")
        return
    device = t_acts[0]["q"].device
    kb = kblocks(k)
    for name in names:
        if name in torch_state["failed"]:
            entry = dict(status="refused", why="failed the float64 check")
        elif time.perf_counter() > deadline:
            entry = dict(status="skipped", why="time budget")
        else:
            try:
                if name == "torch_blockwise":
                    attempts = []
                    form, error = select_blockwise_form(
                        m, kb, t_acts[0], t_weights[0], refs["block"], k, rows, torch_state["bad_forms"], attempts
                    )
                    if form is None:
                        entry = dict(status="error", error=error, attempts=attempts)
                    else:
                        inputs = [blockwise_prepare(form, ta, tw) for ta, tw in zip(t_acts, t_weights)]
                        entry = time_torch_path(blockwise_call, inputs, refs["block"], k, rows, args.reps, device)
                        entry.update(form=form_key(form, m, kb), attempts=attempts)
                else:
                    prepare, call = (
                        (rowwise_prepare, rowwise_call) if name == "torch_rowwise_fp8" else (bf16_prepare, bf16_call)
                    )
                    inputs = [prepare(ta, tw) for ta, tw in zip(t_acts, t_weights)]
                    entry = time_torch_path(call, inputs, refs[kind_of(name)], k, rows, args.reps, device)
            except Exception as err:
                entry = dict(status="error", error=f"{type(err).__name__}: {str(err)[:400]}")
        entry.update(figures_of(name, entry, m, k, n))
        row["paths"][name] = entry
        print_path(row, name)


def figures_of(name, entry, m, k, n) -> dict:
    out = {}
    for clock in ("wall_s", "cupti_s", "events_s"):
        if entry.get(clock):
            out[clock[: -len("_s")]] = figures(name, entry[clock], m, k, n)
    return out


def best_block_variant(row):
    """The fastest (wall clock) XLA block formulation that passed its check: (name, seconds)."""
    best = None
    for name, entry in row["paths"].items():
        if name.startswith("xla_block") and entry.get("status") == "ok" and entry.get("wall_s"):
            if best is None or entry["wall_s"] < best[1]:
                best = (name, entry["wall_s"])
    return best


def ratios(row) -> dict:
    """Time ratios (> 1: xla_block is faster), by wall clock and where both have it by kernel time."""
    p = row["paths"]

    def t(name, clock):
        return p.get(name, {}).get(clock)

    out = {}
    base = t("xla_block", "wall_s")
    for other in ("torch_blockwise", "xla_bf16", "torch_bf16", "xla_per_channel_fp8"):
        if base and t(other, "wall_s"):
            out[f"{other}/xla_block"] = t(other, "wall_s") / base
    if t("xla_block", "cupti_s") and t("xla_bf16", "cupti_s"):
        out["xla_bf16/xla_block (cupti)"] = t("xla_bf16", "cupti_s") / t("xla_block", "cupti_s")
    if t("torch_blockwise", "events_s") and t("xla_block", "cupti_s"):
        out["torch_blockwise (events)/xla_block (cupti)"] = t("torch_blockwise", "events_s") / t("xla_block", "cupti_s")
    best = best_block_variant(row)
    if best:
        out["best_xla_block_variant"] = best[0]
        if base:
            out["best_variant/xla_block"] = best[1] / base
    return out


def print_path(row, name):
    e = row["paths"][name]
    if e.get("status") != "ok":
        detail = e.get("same_as") or e.get("why") or e.get("error") or (e.get("check") or {}).get("err")
        print(f"  {row['m']}x{row['k']}x{row['n']} {name}: {e.get('status')} ({detail})", flush=True)
        return
    wall = e["wall_s"] * 1e3
    other = e.get("cupti_s") or e.get("events_s")
    clock = "CUPTI" if "cupti_s" in e else "events"
    other = f"{other * 1e3:.4g} ms" if other else "-"
    fig = e.get("wall", {})
    extra = f" {fig['tbps']:.2f} TB/s" if "tbps" in fig else ""
    mem = f" temp {e['temp_bytes'] / 2**20:.0f} MiB" if "temp_bytes" in e else ""
    form = f" [{e['form']}]" if e.get("form") else ""
    print(
        f"  {row['m']}x{row['k']}x{row['n']} {name}{form}: wall {wall:.4g} ms, {clock} "
        f"{other}, {fig.get('tflops', 0):.1f} TFLOP/s ({100 * fig.get('frac_peak', 0):.1f}% of peak)"
        f"{extra}{mem}"
        + (f" ABOVE PEAK: {fig['above_peak']}" if fig.get("above_peak") else "")
        + (f" (compile {e['compile_s']:.1f} s)" if "compile_s" in e else ""),
        flush=True,
    )


# --- the table -------------------------------------------------------------------------------------


SHORT = {
    "xla_block_scan": "scan",
    "xla_block_dequant_x6": "deq_x6",
    "xla_block_dequant_x3": "deq_x3",
    "block_fp8_matmul": "public_call",
    "xla_per_channel_fp8": "xla_perch_fp8",
    "torch_blockwise": "torch_block",
    "torch_rowwise_fp8": "torch_row_fp8",
}


def _cell_ms(e) -> str:
    if e is None:
        return "-"
    status = e.get("status")
    if status == "same_as":
        return "=" + e["same_as"].replace("xla_block_budget_", "")
    if status != "ok":
        return {"failed_check": "WRONG", "refused": "refused", "skipped": "skip", "unavailable": "n/a"}.get(
            status, "err"
        )
    second = e.get("cupti_s") or e.get("events_s")
    return f"{e['wall_s'] * 1e3:.3g}/{second * 1e3:.3g}" if second else f"{e['wall_s'] * 1e3:.3g}/-"


def print_table(results):
    rows = results["rows"]
    budget_names = [f"xla_block_budget_{label}" for label in results["config"]["budgets"]]
    public = any(r["paths"].get("block_fp8_matmul", {}).get("status") == "ok" for r in rows)
    cols = ["xla_block", *budget_names, *(["block_fp8_matmul"] if public else []), *TABLE_PATHS[1:]]
    print("\nms per call: wall / CUPTI (JAX), wall / CUDA events (torch); '=x': the same program as x")
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | "
        + " ".join(f"{SHORT.get(c, c.replace('xla_block_budget_', 'budget_')):>14}" for c in cols)
    )
    for r in rows:
        cells = [_cell_ms(r["paths"].get(c)) for c in cols]
        print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | " + " ".join(f"{c:>14}" for c in cells))
    print(
        "\nTFLOP/s by wall clock (% of the fp8 peak 1979, bf16 rows of 989); M <= 128 also TB/s (of 4.8);"
        " ratios are times (> 1: xla_block faster)"
    )
    tcols = ("xla_block", "best_variant", "xla_bf16", "xla_perch", "torch_blockwise", "torch_bf16")
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | "
        + " ".join(f"{c:>18}" for c in tcols)
        + f" | {'torch_bw/xla_block':>18} {'xla_bf16/xla_block':>18} best variant"
    )
    for r in rows:
        best = best_block_variant(r)
        names = (
            "xla_block",
            best[0] if best else None,
            "xla_bf16",
            "xla_per_channel_fp8",
            "torch_blockwise",
            "torch_bf16",
        )
        cells = []
        for name in names:
            fig = r["paths"].get(name, {}).get("wall") if name else None
            if not fig:
                cells.append("-")
                continue
            text = f"{fig['tflops']:.1f} ({100 * fig['frac_peak']:.0f}%)"
            if "tbps" in fig:
                text += f" {fig['tbps']:.2f}TB/s"
            if fig.get("above_peak"):
                text += "!"
            cells.append(text)
        rat = r.get("ratios", {})
        tb = rat.get("torch_blockwise/xla_block")
        bf = rat.get("xla_bf16/xla_block")
        print(
            f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | "
            + " ".join(f"{c:>18}" for c in cells)
            + f" | {'-' if tb is None else f'{tb:.2f}':>18} {'-' if bf is None else f'{bf:.2f}':>18}"
            + f" {rat.get('best_xla_block_variant', '-')}"
        )
    above = [
        (r["m"], r["k"], r["n"], name, clock, msg)
        for r in rows
        for name, e in r["paths"].items()
        for clock in ("wall", "cupti", "events")
        for msg in (e.get(clock) or {}).get("above_peak", [])
    ]
    for m, k, n, name, clock, msg in above:
        print(f"ABOVE PEAK (a measurement error): {m}x{k}x{n} {name} {clock}: {msg}")
    checks = results["checks"]
    passed = sum(c.get("ok") is True for c in checks)
    wrong = [c for c in checks if c.get("ok") is False and (c.get("err") is not None or c.get("wrong_forms"))]
    raised = [c for c in checks if c.get("ok") is False and c not in wrong]
    print(
        f"\nchecks: {passed}/{len(checks)} passed, {len(wrong)} gave wrong numbers, {len(raised)} raised, "
        f"{len(checks) - passed - len(wrong) - len(raised)} unavailable"
    )
    for c in checks:
        for form in c.get("wrong_forms", []):
            print(f"  WRONG: {c['path']} [{form}] {c['m']}x{c['k']}x{c['n']}")
        if c in wrong and c.get("err") is not None and not c["ok"]:
            print(f"  WRONG: {c['path']} {c['m']}x{c['k']}x{c['n']}: error {c['err']:.3g} > tol {c['tol']:.3g}")
    for e in results.get("errors", []):
        print(f"FAILED: {e}")
    if results["skipped"]:
        print(f"skipped for the time budget: {[(s['m'], s['k'], s['n']) for s in results['skipped']]}")
    torch_note = f" ({results['torch_error']})" if results.get("torch_error") else ""
    print(f"CUPTI: {results.get('cupti')}; torch: {results.get('torch')}{torch_note}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="two shapes at M in {1, 128, 4096}")
    parser.add_argument("--ms", type=int, nargs="+", help="M values (default: 1 16 128 1024 4096)")
    parser.add_argument("--kn", type=int, nargs=2, action="append", help="a (K, N) pair; repeatable")
    parser.add_argument("--reps", type=int, default=10, help="timed loops per figure (median)")
    parser.add_argument("--r-small", type=int, default=R_SMALL, help=f"operand sets at M <= {SMALL_M}")
    parser.add_argument("--r-large", type=int, default=R_LARGE, help=f"operand sets at M > {SMALL_M}")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="partial-product budgets, e.g. 256MiB")
    parser.add_argument(
        "--check", type=int, nargs=3, action="append", metavar=("M", "K", "N"), help="a check shape; repeatable"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        help="time only these rows (names as in the docstring; 'xla_block_budget' for all budgets); "
        "xla_block always runs, and every path is still checked first",
    )
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; rows left after it are skipped")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "block_fp8.json"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    ms = tuple(args.ms) if args.ms else (QUICK_MS if args.quick else M_VALUES)
    kns = [tuple(kn) for kn in args.kn] if args.kn else list(QUICK_KN if args.quick else KN)
    checks = [tuple(c) for c in args.check] if args.check else list(CHECK_SHAPES)
    default_budget = block_scaled_mm.PARTIAL_PRODUCT_BYTES
    budgets = [b for b in dict.fromkeys(parse_bytes(b) for b in args.budgets) if b != default_budget]
    device = jax.devices()[0]
    torch_state = {"error": None, "bad_forms": set(), "failed": set()}
    if torch is None:
        torch_state["error"] = "torch is not installed"
    else:  # bf16 GEMMs summed in float32 throughout, as XLA's (split-K partials not rounded to bf16)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    results = dict(
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        torch=torch.__version__ if torch is not None else None,
        config=dict(
            ms=list(ms),
            kn=[list(kn) for kn in kns],
            reps=args.reps,
            r_small=args.r_small,
            r_large=args.r_large,
            small_m=SMALL_M,
            block=list(BLOCK),
            out_dtype="bfloat16",
            default_partial_product_bytes=default_budget,
            budgets=[bytes_label(b) for b in budgets],
            check_shapes=[list(c) for c in checks],
            torch_bf16_reduced_precision_reduction=False if torch is not None else None,
            time_budget_s=args.time_budget,
            peaks=dict(fp8_tflops=FP8_PEAK_TFLOPS, bf16_tflops=BF16_PEAK_TFLOPS, hbm_tbps=HBM_TBPS),
        ),
        checks=[],
        rows=[],
        skipped=[],
        errors=[],
        start=start,
    )
    print(
        f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, torch {results['torch']}", flush=True
    )

    def save():
        results["elapsed_s"] = time.perf_counter() - start
        stats = device.memory_stats() or {}
        results["process_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        out = {key: value for key, value in results.items() if key != "start"}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)

    failed_jax = run_checks(results, checks, budgets, torch_state)
    save()
    bench(results, ms, kns, args, budgets, failed_jax, torch_state, start + args.time_budget, save)
    results["torch_error"] = torch_state["error"]
    results["torch_forms_with_wrong_numbers"] = sorted(torch_state["bad_forms"])
    save()
    print_table(results)
    print(f"\nwrote {args.json} ({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
