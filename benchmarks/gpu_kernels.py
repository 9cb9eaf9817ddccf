"""Hopper kernels: check, then time the fused fp8 GEMM and the per-token quant against XLA and torch.

One run, one device: correctness against the float64 reference first, then per shape the median
time of our kernel (rowwise and per-tensor scales), the XLA per-tensor and rowwise paths and
`torch._scaled_mm` per-tensor and rowwise; then per-token quant (ours, XLA, a plain copy) in
bytes/s. Prints a short table last; full numbers go to `$OUT/gpu_kernels.json` (or `--json`).

  python benchmarks/gpu_kernels.py [--quick] [--explore | --configs NAME ...] [--ms M ...] [--kn K N ...]
                                   [--json PATH]

Timing: every timed call gets distinct operands (a jitted loop over R pre-made inputs returns
all R outputs, so XLA can neither merge nor drop calls; torch loops over the same R inputs), one
warm-up, then the median of `--reps` timed loops, divided by R. JAX is timed by CUPTI (the GPU
time of the kernels launched, without JAX's per-call dispatch), torch by CUDA events around its
loop. Neither side flushes L2.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference
from timing import time_jax, time_jax_wall, time_torch

import w8a8_jax
from w8a8_jax import quantization, scaled_mm
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

try:
    from w8a8_jax.kernels.gpu import quant as gpu_quant
except ImportError:
    gpu_quant = None

M_VALUES = (1, 8, 16, 64, 128, 1024, 4096, 8192)
KN = ((4096, 6144), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344), (28672, 8192))
R = 8  # distinct activation sets per timed loop


def _fp8(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -1.5, 1.5).astype(jnp.float8_e4m3fn)


def check_gemm(results):
    """Kernel vs float64 reference on shapes covering both schedules, odd M, bias, out dtypes."""
    key = jax.random.key(0)
    cases = [
        (1, 4096, 6144, "rowwise", True, jnp.bfloat16),
        (7, 4096, 4096, "per_tensor", False, jnp.float16),
        (33, 4096, 1024, "rowwise", True, jnp.float32),
        (64, 8192, 1024, "rowwise", False, jnp.bfloat16),
        (65, 4096, 1024, "rowwise", True, jnp.bfloat16),
        (300, 4096, 640, "per_tensor", True, jnp.float32),
        (1024, 4096, 1024, "rowwise", True, jnp.bfloat16),
        (256, 14336, 512, "rowwise", False, jnp.float32),
        (8, 14336, 512, "rowwise", False, jnp.float32),
    ]
    for m, k, n, scales, with_bias, out_dtype in cases:
        key, ka, kb, ks, kt, kbias = jax.random.split(key, 6)
        a, b = _fp8(ka, (m, k)), _fp8(kb, (n, k))
        if scales == "rowwise":
            sa = jax.random.uniform(ks, (m, 1), jnp.float32, 0.01, 0.1)
            sb = jax.random.uniform(kt, (n, 1), jnp.float32, 0.01, 0.1)
        else:
            sa, sb = jnp.array([0.05], jnp.float32), jnp.array([0.02], jnp.float32)
        bias = jax.random.normal(kbias, (n,), jnp.float32).astype(out_dtype) if with_bias else None
        out = jax.jit(gpu_mm.scaled_mm, static_argnums=5)(a, b, sa, sb, bias, out_dtype)
        ref = reference.scaled_mm(a, b, sa, sb, bias)
        out64 = np.asarray(out).astype(np.float64)
        err = float(np.abs(out64 - ref).max() / np.abs(ref).max())
        tol = reference.gemm_tolerance(k, out_dtype)
        ok = bool(np.isfinite(out64).all() and err <= tol)
        results.append(
            dict(
                kind="gemm_check",
                m=m,
                k=k,
                n=n,
                scales=scales,
                bias=with_bias,
                out_dtype=jnp.dtype(out_dtype).name,
                err=err,
                tol=tol,
                ok=ok,
            )
        )
        print(
            f"check gemm {m}x{k}x{n} {scales} bias={with_bias} {jnp.dtype(out_dtype).name}: "
            f"err {err:.3g} tol {tol:.3g} {'OK' if ok else 'FAIL'}",
            flush=True,
        )


def check_quant(results):
    key = jax.random.key(1)
    for m, k, dtype in (
        (1, 4096, jnp.bfloat16),
        (77, 4096, jnp.bfloat16),
        (1024, 8192, jnp.bfloat16),
        (100, 1024, jnp.float32),
        (64, 2048, jnp.float16),
    ):
        key, kx = jax.random.split(key)
        x = (jax.random.normal(kx, (m, k), jnp.float32) * 3).astype(dtype)
        q, s = jax.jit(gpu_quant.per_token_quant, static_argnums=2)(x, None, jnp.float8_e4m3fn)
        q_ref, s_ref = quantization.quantize_per_token(x, None, jnp.float8_e4m3fn)
        same = bool(
            (np.asarray(q).view(np.uint8) == np.asarray(q_ref).view(np.uint8)).all()
            and (np.asarray(s) == np.asarray(s_ref)).all()
        )
        results.append(dict(kind="quant_check", m=m, k=k, dtype=jnp.dtype(dtype).name, identical=same))
        print(f"check quant {m}x{k} {jnp.dtype(dtype).name}: {'IDENTICAL' if same else 'DIFFERENT'}", flush=True)


EXPLORE = {
    "cm_persistent": tbs.NARROW_GEMM,  # the default before v7: CTA 128x128
    "cm_persistent_minor_m": tbs.GemmConfig(cluster="m", persistent_pipeline=True, grid_minor="m"),
    "cn_persistent_minor_m": tbs.GemmConfig(cluster="n", persistent_pipeline=True, grid_minor="m"),
    "cn_persistent": tbs.GemmConfig(cluster="n", persistent_pipeline=True),
    "cm_persistent_w8": tbs.GemmConfig(cluster="m", persistent_pipeline=True, grid_tile_width=8),
    "cm_persistent_w32": tbs.GemmConfig(cluster="m", persistent_pipeline=True, grid_tile_width=32),
    "cm_persistent_epi128": tbs.GemmConfig(cluster="m", persistent_pipeline=True, epi_tile_n=128),
    # CTA 128x256: each warpgroup's 64x256 total promoted in two 128-column chunks (192 registers).
    "cm_persistent_n256": tbs.DEFAULT_GEMM,
}


def check_configs(results, configs):
    """Error of each explored large-M config at long K (promotion's reason to exist)."""
    key = jax.random.key(4)
    m, k, n = 256, 14336, 512
    ka, kb, ks, kt = jax.random.split(key, 4)
    a, b = _fp8(ka, (m, k)), _fp8(kb, (n, k))
    sa = jax.random.uniform(ks, (m, 1), jnp.float32, 0.01, 0.1)
    sb = jax.random.uniform(kt, (n, 1), jnp.float32, 0.01, 0.1)
    ref = reference.scaled_mm(a, b, sa, sb, None)
    for name, config in configs.items():
        try:
            out = gpu_mm.scaled_mm(a, b, sa, sb, None, jnp.float32, config=config)
            err = float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())
        except Exception as e:  # a failing variant is reported, not fatal
            err = None
            print(f"config {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        results.append(dict(kind="config_error", config=name, m=m, k=k, n=n, err=err))
        print(f"config {name} error at K={k}: {err}", flush=True)


def bench_gemm(results, m_values, kn_values, reps, configs):
    """Each timed call gets its own activation AND weight (R pairs): XLA merges dots that share an
    operand (its dot merger), which would time one batched GEMM instead of R layers."""
    import torch

    key = jax.random.key(2)
    for k, n in kn_values:
        key, kb = jax.random.split(key)
        weights = [_fp8(kk, (n, k)) for kk in jax.random.split(kb, R)]
        w_scale_row = jnp.full((n, 1), 0.01, jnp.float32)
        w_scale_t = jnp.array([0.01], jnp.float32)
        tws = [torch.empty((n, k), device="cuda").uniform_(-1.5, 1.5).to(torch.float8_e4m3fn) for _ in range(R)]
        tw_scale_row = torch.full((1, n), 0.01, device="cuda")
        one = torch.tensor(0.01, device="cuda")
        for m in m_values:
            keys = jax.random.split(jax.random.fold_in(key, m), R)
            xs = [(_fp8(kk, (m, k)), jnp.full((m, 1), 0.02, jnp.float32), w) for kk, w in zip(keys, weights)]
            txs = [(torch.empty((m, k), device="cuda").uniform_(-1.5, 1.5).to(torch.float8_e4m3fn), tw) for tw in tws]
            t_scale_row = torch.full((m, 1), 0.02, device="cuda")
            flops = 2.0 * m * n * k
            row = dict(kind="gemm", m=m, k=k, n=n)

            def ours_rowwise(config=None):
                return lambda x: gpu_mm.scaled_mm(x[0], x[2], x[1], w_scale_row, None, jnp.bfloat16, config=config)

            variants = {
                "ours_rowwise": ours_rowwise(),
                "xla_tensor": lambda x: scaled_mm.xla_per_tensor_w8a8_scaled_mm(
                    x[0], x[2], w_scale_t, w_scale_t, None, jnp.bfloat16
                ),
                "xla_rowwise": lambda x: scaled_mm.xla_per_token_w8a8_scaled_mm(
                    x[0], x[2], x[1], w_scale_row, None, jnp.bfloat16
                ),
            }
            if m >= 1024:  # per-tensor scales run the same kernel; measured where it is compute-bound
                variants["ours_tensor"] = lambda x: gpu_mm.scaled_mm(
                    x[0], x[2], w_scale_t, w_scale_t, None, jnp.bfloat16
                )
            for name, config in configs.items():
                variants[name] = ours_rowwise(config)
            for name, fn in variants.items():
                try:
                    row[name] = time_jax(fn, xs, reps)
                except Exception as err:  # a failing variant is reported, not fatal
                    row[name] = None
                    print(f"{name} {m}x{k}x{n} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            row["torch_tensor"] = time_torch(
                lambda x: torch._scaled_mm(x[0], x[1].t(), one, one, out_dtype=torch.bfloat16), txs, reps
            )
            row["torch_rowwise"] = time_torch(
                lambda x: torch._scaled_mm(x[0], x[1].t(), t_scale_row, tw_scale_row, out_dtype=torch.bfloat16),
                txs,
                reps,
            )
            row["tflops"] = {
                v: (flops / t / 1e12 if t else None) for v, t in row.items() if v not in ("kind", "m", "k", "n")
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            del xs, txs
        del weights, tws


def _per_token_any_amax(x):
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    scale = jnp.maximum(quantization.true_divide(amax, jnp.float32(448)), jnp.float32(1 / (448 * 512)))
    return jnp.clip(quantization.true_divide(x, scale), -448, 448).astype(jnp.float8_e4m3fn), scale


def bench_quant(results, shapes, reps):
    import torch  # noqa: F401

    key = jax.random.key(3)
    for m, k in shapes:
        keys = jax.random.split(jax.random.fold_in(key, m * k), R)
        xs = [jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16) for kk in keys]
        nbytes = m * k * 2 + m * k + m * 4  # read bf16, write fp8 codes and scales
        row = dict(kind="quant", m=m, k=k)
        variants = {
            "xla": lambda x: quantization.quantize_per_token(x, None, jnp.float8_e4m3fn),
            # The other two schemes, XLA-fused, for the note's "would a kernel help" question.
            "xla_static": lambda x: quantization.scaled_fp8_quant(x, jnp.array([0.01], jnp.float32))[0],
            "xla_dynamic_tensor": lambda x: quantization.scaled_fp8_quant(x)[0],
            # The per-token formula with the amax over every value (NaN and Inf included), as it
            # was before the amax skipped them: prices the finite mask.
            "xla_any_amax": _per_token_any_amax,
            "copy": lambda x: x + jnp.bfloat16(1),  # reads and writes 2 bytes an element
        }
        if gpu_quant is not None:
            variants["ours"] = lambda x: gpu_quant.per_token_quant(x, None, jnp.float8_e4m3fn)
            for rows in (2, 4):
                variants[f"ours_r{rows}"] = (
                    lambda r: lambda x: gpu_quant.per_token_quant(x, None, jnp.float8_e4m3fn, rows_per_block=r)
                )(rows)
        wall = {}
        for name, fn in variants.items():
            try:
                row[name] = time_jax(fn, xs, reps)
                wall[name] = time_jax_wall(fn, xs, reps)
            except Exception as err:
                row[name] = wall[name] = None
                print(f"quant {name} {m}x{k} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        moved = {name: 4 * m * k if name == "copy" else nbytes for name in variants}
        row["TBps"] = {name: moved[name] / row[name] / 1e12 if row.get(name) else None for name in variants}
        row["wall_TBps"] = {name: moved[name] / wall[name] / 1e12 if wall.get(name) else None for name in variants}
        results.append(row)
        print(json.dumps(row), flush=True)


def bench_e2e(results, m_values, kn_values, reps):
    """`Fp8LinearOp.apply` (bf16 in, dynamic per-token, per-channel weight) against XLA's bf16 GEMM:
    as registered (the quant kernel, then the GEMM the routing table picks), with
    `fused_supported=False` (the quant kernel, then XLA's GEMM), and the quant kernel feeding the
    GEMM kernel directly."""
    key = jax.random.key(5)
    contract = (((1,), (1,)), ((), ()))
    fused = w8a8_jax.Fp8LinearOp(use_per_token_if_dynamic=True, pad_output=False)
    xla = w8a8_jax.Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True, pad_output=False)
    for k, n in kn_values:
        kw = jax.random.fold_in(key, k * n)
        ws = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02 for kk in jax.random.split(kw, R)]
        qws = [jnp.clip(w.astype(jnp.float32) * 2000, -448, 448).astype(jnp.float8_e4m3fn) for w in ws]
        w_scale = jnp.full((n, 1), 5e-4, jnp.float32)
        for m in m_values:
            xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(jax.random.fold_in(kw, m), R)]

            def kernels(x, qw):
                q, s = gpu_quant.per_token_quant(x, None, jnp.float8_e4m3fn)
                return gpu_mm.scaled_mm(q, qw, s, w_scale, None, jnp.bfloat16)

            variants = {
                "xla_bf16": (
                    lambda p: jax.lax.dot_general(p[0], p[1], contract, preferred_element_type=jnp.bfloat16),
                    ws,
                ),
                "op_registered": (lambda p: fused.apply(p[0], p[1], w_scale), qws),
                "op_xla": (lambda p: xla.apply(p[0], p[1], w_scale), qws),
                "quant_kernel_gemm_kernel": (lambda p: kernels(*p), qws),
            }
            row = dict(kind="e2e", m=m, k=k, n=n)
            for name, (fn, weights) in variants.items():
                try:
                    row[name] = time_jax(fn, list(zip(xs, weights)), reps)
                except Exception as err:
                    row[name] = None
                    print(f"e2e {name} {m}x{k}x{n} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            row["tflops"] = {v: 2.0 * m * n * k / row[v] / 1e12 for v in variants if row.get(v)}
            results.append(row)
            print(json.dumps(row), flush=True)


def kernel_wins(results, margin=1.03):
    """`(m, k, n)` of the GEMM rows where the kernel (rowwise) beat the faster XLA path by `margin`:
    the measured basis of `tuned_block_sizes.KERNEL_FASTER_THAN_XLA`."""
    wins = []
    for r in results:
        xla = [r[c] for c in ("xla_tensor", "xla_rowwise") if r.get(c)]
        if r["kind"] == "gemm" and r.get("ours_rowwise") and xla and min(xla) >= margin * r["ours_rowwise"]:
            wins.append((r["m"], r["k"], r["n"]))
    return wins


def print_table(results):
    print("\nGEMM, bf16 out, TFLOP/s (M<=64: us), ratios ours/torch")
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'ours_row':>8} {'ours_t':>8} {'xla_t':>8} {'xla_row':>8} "
        f"{'tch_t':>8} {'tch_row':>8} | {'row/tch':>7} {'t/tch':>6}"
    )
    for r in results:
        if r["kind"] != "gemm":
            continue
        small = r["m"] <= 64
        cols = ["ours_rowwise", "ours_tensor", "xla_tensor", "xla_rowwise", "torch_tensor", "torch_rowwise"]
        vals = [(r[c] * 1e6 if small else r["tflops"][c]) if r.get(c) else float("nan") for c in cols]
        ratio_row = r["torch_rowwise"] / r["ours_rowwise"] if r.get("ours_rowwise") else float("nan")
        ratio_t = r["torch_tensor"] / r["ours_tensor"] if r.get("ours_tensor") else float("nan")
        print(
            f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | "
            + " ".join(f"{v:8.1f}" for v in vals)
            + f" | {ratio_row:7.2f} {ratio_t:6.2f}"
        )
    print(f"\nkernel >= 3% faster than XLA's faster path at (M, K, N): {kernel_wins(results)}")
    extra = sorted({c for r in results if r["kind"] == "gemm" for c in r if c in EXPLORE})
    if extra:
        print("\nconfigs explored (us)")
        for r in results:
            if r["kind"] == "gemm":
                cells = " ".join(f"{c}={r[c] * 1e6:.1f}" for c in extra if r.get(c))
                print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells}")
    for key, what in (("TBps", "CUPTI kernel time"), ("wall_TBps", "wall clock")):
        print(f"\nper-token quant, bf16 in, TB/s ({what})")
        for r in results:
            if r["kind"] == "quant":
                t = r[key]
                cells = " ".join(f"{name} {v:6.2f}" if v else f"{name}    nan" for name, v in t.items())
                print(f"{r['m']:>5} x {r['k']:>6}: {cells}")
    print("\nFp8LinearOp.apply end to end (bf16 in, per-token), TFLOP/s, and speed-up over XLA bf16")
    for r in results:
        if r["kind"] == "e2e":
            t = r["tflops"]
            cells = " ".join(f"{name} {v:7.1f}" for name, v in t.items())
            best = max((v for name, v in t.items() if name != "xla_bf16"), default=float("nan"))
            print(
                f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells} | best/bf16 {best / t.get('xla_bf16', float('nan')):.2f}"
            )
    checks = [r for r in results if r["kind"].endswith("_check")]
    print(f"\nchecks: {sum(bool(r.get('ok', r.get('identical'))) for r in checks)}/{len(checks)} passed")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-quant", action="store_true")
    parser.add_argument("--explore", action="store_true", help="also time every candidate config")
    parser.add_argument("--configs", nargs="+", choices=sorted(EXPLORE), default=[], help="also time these configs")
    parser.add_argument("--ms", type=int, nargs="+", help="M values (default: the full list)")
    parser.add_argument("--kn", type=int, nargs=2, action="append", help="a (K, N) pair; repeatable")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also time Fp8LinearOp.apply against XLA bf16")
    parser.add_argument("--e2e-ms", type=int, nargs="+", default=[4096], help="M values of the end-to-end rows")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_kernels.json"))
    args = parser.parse_args()
    configs = dict(EXPLORE) if args.explore else {name: EXPLORE[name] for name in args.configs}
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    results = []
    if not args.skip_checks:
        check_gemm(results)
        if not args.skip_quant and gpu_quant is not None:
            check_quant(results)
        if configs:
            check_configs(results, configs)
    ms = args.ms or ((1, 16, 4096) if args.quick else M_VALUES)
    kns = [tuple(kn) for kn in args.kn] if args.kn else (((4096, 28672), (8192, 8192)) if args.quick else KN)
    if not args.skip_gemm:
        bench_gemm(results, ms, kns, args.reps, configs)
    if args.e2e:
        bench_e2e(results, args.e2e_ms, kns, args.reps)
    if not args.skip_quant:
        bench_quant(results, ((1024, 4096), (4096, 4096), (8192, 8192), (4096, 14336)), args.reps)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
