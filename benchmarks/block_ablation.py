"""Where the Hopper block kernel's time goes: the kernel on its schedules, and rebuilt with one part
of its block-scale promotion left out, against the rowwise kernel on the same schedule.

A variant is a schedule and, after `+`, source edits of `kernels/gpu/scaled_mm.py` (applied to a
copy of the module, `EDITS`); an edited kernel's sums are wrong, so it is timed, not used:

  wide, narrow, wide_n   the block kernel on the 128x256 CTA (`DEFAULT_GEMM`), the 128x128 CTA
                         (`NARROW_GEMM`, its default) or the 64x256 one (warpgroups along N)
  rowwise_wide           the rowwise kernel (`scaled_mm`) on the 128x256 CTA
  wide_c64, rowwise_wide_c64
                         the 128x256 CTA promoted in 64-column chunks (`GemmConfig.promote_n`)
  wide_pw, wide_c64_pw   with the weight scales through the pipeline (`pipelined_weight_scales`)
  rowwise_narrow         the rowwise kernel on the 128x128 CTA
  ..._k<S>               any of them with K split in S slices (`GemmConfig.k_splits`), e.g. narrow_k4
  +no_scales             promotion without the block scales (their slab still travels each stage)
  +row_scales_only       each chunk multiplied by its rows' activation scales only
  +weight_scales_only    each chunk multiplied by its weight block's scale only
  +producer_24           24 registers for the TMA warpgroup (40 in the kernel), so 240 for each
                         consumer warpgroup (232)

Each variant runs in a process of its own (no compiled kernel is shared), on R = 4 distinct
operand sets: wall clock over 10 back-to-back calls of one jitted program, the median of 5 samples
(`timing.wall_samples`), and the relative error against XLA's float32 GEMM of the dequantized
operands on the first set.

  python3 benchmarks/block_ablation.py [--shape M K N ...] [--variants V ...] [--json PATH]
"""

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import timing  # noqa: E402

from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block  # noqa: E402
from w8a8_jax.kernels.gpu import scaled_mm  # noqa: E402
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs  # noqa: E402

SCHEDULES = {
    "wide": tbs.DEFAULT_GEMM,
    "narrow": tbs.NARROW_GEMM,
    "wide_n": dataclasses.replace(tbs.NARROW_GEMM, wg_split="n"),
    "rowwise_wide": tbs.DEFAULT_GEMM,
    "wide_c64": dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64),
    "rowwise_wide_c64": dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64),
    "wide_pw": dataclasses.replace(tbs.DEFAULT_GEMM, pipelined_weight_scales=True),
    "wide_c64_pw": dataclasses.replace(tbs.DEFAULT_GEMM, promote_n=64, pipelined_weight_scales=True),
    "rowwise_narrow": tbs.NARROW_GEMM,
}
_SCALE_PRODUCT = "scales = tuple((row_scale * weight_block_scale(block), 0) for block in blocks)"
_ONES = "plgpu.layout_cast(jnp.ones((tile_m,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))"
EDITS = {
    "no_scales": (
        (
            "return _mma_step(carry, a_tile, b_tile, config.promote, scales)",
            "return _mma_step(carry, a_tile, b_tile, config.promote, None)",
        ),
    ),
    "row_scales_only": ((_SCALE_PRODUCT, "scales = tuple((row_scale, 0) for block in blocks)"),),
    "weight_scales_only": (
        (_SCALE_PRODUCT, f"scales = tuple(({_ONES} * weight_block_scale(block), 0) for block in blocks)"),
    ),
    "producer_24": (("memory_registers=40", "memory_registers=24"),),
}
SHAPES = ((4096, 7168, 24576), (4096, 18432, 7168))
VARIANTS = ("rowwise_wide", "wide", "wide+no_scales", "wide+row_scales_only", "wide+weight_scales_only", "narrow")
R, CALLS, REPEATS = 4, 10, 5


def edited_source(edits) -> str:
    """`scaled_mm`'s source with `edits` (names of `EDITS`) applied; each must match exactly once."""
    source = inspect.getsource(scaled_mm)
    for name in edits:
        for old, new in EDITS[name]:
            if source.count(old) != 1:
                raise ValueError(f"edit {name!r} no longer matches kernels/gpu/scaled_mm.py: {old!r}")
            source = source.replace(old, new)
    return source


def use_edited_kernel(edits) -> None:
    """Makes `scaled_mm` launch the kernel of its edited copy (for this process), and drops what JAX
    traced with the kernel before (the jitted wrappers would reuse it)."""
    module = types.ModuleType("scaled_mm_edited")
    exec(compile(edited_source(edits), "scaled_mm_edited.py", "exec"), module.__dict__)
    scaled_mm._gemm_kernel = module._gemm_kernel
    jax.clear_caches()


def _operands(key, m, k, n, rowwise: bool):
    ka, kw, ks, kt = jax.random.split(key, 4)
    a = jax.random.uniform(ka, (m, k), jnp.float32, -1.5, 1.5).astype(jnp.float8_e4m3fn)
    w = jax.random.uniform(kw, (n, k), jnp.float32, -1.5, 1.5).astype(jnp.float8_e4m3fn)
    a_shape, w_shape = ((m,), (n,)) if rowwise else ((m, k // 128), (n // 128, k // 128))
    return (
        a,
        w,
        jax.random.uniform(ks, a_shape, jnp.float32, 0.01, 0.03),
        jax.random.uniform(kt, w_shape, jnp.float32, 0.005, 0.015),
    )


def _dequantized_product(a, w, sa, sb):
    """XLA's float32 GEMM of the dequantized operands (block or rowwise scales)."""
    (m, k), n = a.shape, w.shape[0]
    if sa.ndim == 1:
        a32, w32 = a.astype(jnp.float32) * sa[:, None], w.astype(jnp.float32) * sb[:, None]
    else:
        a32 = (a.astype(jnp.float32).reshape(m, k // 128, 128) * sa[:, :, None]).reshape(m, k)
        w32 = w.astype(jnp.float32).reshape(n // 128, 128, k // 128, 128) * sb[:, None, :, None]
        w32 = w32.reshape(n, k)
    return jnp.dot(a32, w32.T, precision=jax.lax.Precision.HIGHEST)


def parse_variant(spec: str):
    """`(config, edits)` of a variant's name (the module docstring's)."""
    schedule, *edits = spec.split("+")
    name, _, splits = schedule.partition("_k")
    if name not in SCHEDULES or not (splits == "" or splits.isdigit()) or any(e not in EDITS for e in edits):
        raise ValueError(f"unknown variant {spec!r}: schedules {sorted(SCHEDULES)} (+ _k<S>), edits {sorted(EDITS)}")
    config = SCHEDULES[name]
    return (dataclasses.replace(config, k_splits=int(splits)) if splits else config), edits


def run_one(spec: str, m: int, k: int, n: int, *, interpret: bool = False, r: int = R) -> dict:
    """One variant (`spec`, the module docstring's names) at `(m, k) @ (n, k).T`, bf16 out."""
    config, edits = parse_variant(spec)
    if m % 256 or k % 128 or n % config.n_multiple:
        raise ValueError(
            f"the ablation takes M a multiple of 256, K of 128 and N of {config.n_multiple}, got {(m, k, n)}"
        )
    if edits:
        use_edited_kernel(edits)
    rowwise = spec.startswith("rowwise")
    sets = [_operands(key, m, k, n, rowwise) for key in jax.random.split(jax.random.key(0), r)]

    def gemm(a, w, sa, sb):
        if rowwise:
            return scaled_mm.scaled_mm(a, w, sa, sb, None, jnp.bfloat16, config=config, interpret=interpret)
        return gpu_block.block_scaled_mm(
            a, w, sa, sb, (128, 128), None, jnp.bfloat16, config=config, interpret=interpret
        )

    compiled, compile_s = timing.compile_looped(lambda xs: gemm(*xs), sets)
    outs = jax.block_until_ready(compiled(sets))
    ref = _dequantized_product(*sets[0])
    err = float(jnp.max(jnp.abs(outs[0].astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
    samples = timing.wall_samples(compiled, sets, REPEATS if not interpret else 1, CALLS if not interpret else 1)
    seconds = statistics.median(samples)
    return dict(
        variant=spec,
        m=m,
        k=k,
        n=n,
        us=seconds * 1e6,
        spread_us=[min(samples) * 1e6, max(samples) * 1e6],
        tflops=2 * m * k * n / seconds / 1e12,
        rel_err=err,
        compile_s=compile_s,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, action="append", help="an (M, K, N); repeatable")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "block_ablation.json"))
    args = parser.parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else SHAPES
    if args.one:
        print(json.dumps(run_one(args.one, *shapes[0])), flush=True)
        return
    results = [dict(kind="run", command="python3 benchmarks/block_ablation.py " + " ".join(argv or sys.argv[1:]))]
    for m, k, n in shapes:
        for spec in args.variants:
            cmd = [sys.executable, __file__, "--one", spec, "--shape", str(m), str(k), str(n)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else dict(variant=spec, m=m, k=k, n=n)
            if "us" not in row:
                row["error"] = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            results.append(row)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(
        "\nblock kernel ablation, bf16 out, wall clock (rel_err: against XLA's float32 GEMM; edited kernels are wrong)"
    )
    for row in results[1:]:
        shape = f"{row['m']}x{row['k']}x{row['n']}"
        if "us" in row:
            print(
                f"{row['variant']:34s} {shape:>17s} {row['us']:9.1f} us {row['tflops']:7.1f} TFLOP/s  err {row['rel_err']:.1e}"
            )
        else:
            print(f"{row['variant']:34s} {shape:>17s} failed: {row['error']}")


if __name__ == "__main__":
    main()
