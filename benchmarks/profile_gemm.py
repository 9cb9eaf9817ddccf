"""One fp8 GEMM, launched for a hardware profiler (Nsight Compute): our Hopper kernel or torch's.

The operands are made on the host (NumPy, ml_dtypes) and copied to the device, so the only kernels
the process launches are the GEMM's own (and, on the JAX side, the small fusions that reshape its
scale vectors): a profiler that records every launch sees the GEMM without filtering by name. The
GEMM runs `--calls` times (the first also compiles).

  ncu --clock-control none --set full -o REPORT python3 benchmarks/profile_gemm.py --side jax --m 8192 --k 8192 --n 8192
  ncu --clock-control none --set full -o REPORT python3 benchmarks/profile_gemm.py --side torch ...

`--side torch` runs `torch._scaled_mm` with the same kind of scales (rowwise: `(M, 1)` and `(1, N)`;
`--per-tensor`: scalars; `--block`: 1x128 activation groups `(M, KB)` and 128x128 weight blocks
`(NB, KB)`, our block-scaled kernel against torch's blockwise GEMM), bf16 out.
"""

import argparse
import os
import sys

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


BLOCK = 128


def operands(m: int, k: int, n: int, block: bool = False, seed: int = 0):
    """`(a (M, K), w (N, K))` e4m3fn codes as uint8 bytes, `scale_a (M, 1)`, `scale_w (N, 1)` float32
    (with `block`: `scale_a (M, ceil(K / 128))`, `scale_w (ceil(N / 128), ceil(K / 128))`)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.5, 1.5, (m, k)).astype(ml_dtypes.float8_e4m3fn)
    w = rng.uniform(-1.5, 1.5, (n, k)).astype(ml_dtypes.float8_e4m3fn)
    kb = -(-k // BLOCK)
    scale_a = rng.uniform(0.01, 0.03, (m, kb if block else 1)).astype(np.float32)
    scale_w = rng.uniform(0.005, 0.015, (-(-n // BLOCK), kb) if block else (n, 1)).astype(np.float32)
    return a.view(np.uint8), w.view(np.uint8), scale_a, scale_w


def run_jax(args, a, w, scale_a, scale_w):
    import jax
    import jax.numpy as jnp

    from w8a8_jax.kernels.gpu import block_scaled_mm, scaled_mm

    a = jax.device_put(a.view(ml_dtypes.float8_e4m3fn))
    w = jax.device_put(w.view(ml_dtypes.float8_e4m3fn))
    if args.per_tensor:
        scale_a, scale_w = scale_a[:1, 0], scale_w[:1, 0]
    scale_a, scale_w = jax.device_put(scale_a), jax.device_put(scale_w)
    if args.block:
        gemm = jax.jit(lambda *xs: block_scaled_mm.block_scaled_mm(*xs, (BLOCK, BLOCK), None, jnp.bfloat16))
    else:
        gemm = jax.jit(lambda *xs: scaled_mm.scaled_mm(*xs, None, jnp.bfloat16))
    for _ in range(args.calls):
        out = gemm(a, w, scale_a, scale_w)
    jax.block_until_ready(out)


def run_torch(args, a, w, scale_a, scale_w):
    import torch

    a = torch.from_numpy(a).cuda().view(torch.float8_e4m3fn)
    w = torch.from_numpy(w).cuda().view(torch.float8_e4m3fn)
    if args.per_tensor:
        sa, sw = torch.tensor(float(scale_a[0, 0])).cuda(), torch.tensor(float(scale_w[0, 0])).cuda()
    elif args.block:  # (M, KB) stored k-block-major, and the (NB, KB) blocks as their transpose
        sa = torch.from_numpy(np.ascontiguousarray(scale_a.T)).cuda().t()
        sw = torch.from_numpy(scale_w).cuda().t()
    else:
        sa, sw = torch.from_numpy(scale_a).cuda(), torch.from_numpy(scale_w).cuda().view(1, -1)
    for _ in range(args.calls):
        out = torch._scaled_mm(a, w.t(), sa, sw, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    del out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("jax", "torch"), required=True)
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--n", type=int, required=True)
    scales = parser.add_mutually_exclusive_group()
    scales.add_argument("--per-tensor", action="store_true")
    scales.add_argument(
        "--block", action="store_true", help="block scales: 1x128 activation groups, 128x128 weight blocks"
    )
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args(argv)
    run = run_jax if args.side == "jax" else run_torch
    run(args, *operands(args.m, args.k, args.n, block=args.block))


if __name__ == "__main__":
    main()
