"""Hopper kernels: check, then time the fused fp8 GEMM and the per-token quant against XLA and torch.

One run, one device: correctness against the float64 reference first, then per (M, K, N) one row
of `timing.compare` on the same operands: our kernel (rowwise scales, its default schedule
`tuned_block_sizes.default_config`: where the tiles underfill the SMs the swapped decode schedule
at M <= 64, K split above; per-tensor at M >= 1024; `ours_large_m`, the large-M schedule
`launch_config`, where the default is another; with `--overlapped`, `ours_overlapped`, overlapped
promotion: each checked first too),
XLA's rowwise and per-tensor fp8 GEMMs and XLA bf16, then `torch._scaled_mm` rowwise and per-tensor
and `torch.mm` bf16 on the very same arrays (DLPack; fp8 as a uint8 view), then the JAX variants
again. Beside them, the GEMM `Fp8LinearOp`'s plan picks for that shape, so the plan's ratio to torch
is read off the row. Then per-token quant (ours, XLA, a plain copy) in bytes/s, and optionally
`Fp8LinearOp.apply` end to end against XLA bf16.

  python3 benchmarks/gpu_kernels.py [--quick] [--explore | --configs NAME ...] [--ms M ...] [--kn K N ...]
                                    [--reps N] [--calls N] [--r N] [--e2e] [--overlapped] [--time-budget S] [--json PATH]

Timing (`timing.py`): R (`--r`, default 8) distinct operand sets per jitted program, so no two
timed GEMMs share an activation or a weight (XLA would merge dots that share one, and a weight would
stay in L2); figures are wall clock over `--calls` (10) back-to-back calls, blocked once, the median
of `--reps` (3) samples per pass with their spread; JAX is timed before and after torch and the
drift between its two passes is kept. CUPTI kernel time is recorded beside (never instead of) the
wall clock. Neither side flushes L2 between calls (the R sets exceed it at the sizes reported).
Prints a short table last; everything goes to `$OUT/gpu_kernels.json` (or `--json`), rewritten
after every row.
"""

import argparse
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference
import timing

import w8a8_jax
from w8a8_jax import dispatch, layout, platform, quantization, scaled_mm
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

try:
    from w8a8_jax.kernels.gpu import quant as gpu_quant
except ImportError:
    gpu_quant = None

try:
    import torch
except ImportError:  # the torch rows are then left out, and said so
    torch = None

M_VALUES = (1, 8, 16, 64, 128, 256, 512, 1024, 4096, 8192)
# Llama-3-8B (QKV, gate/up, down), Llama-3-70B (QKV, gate/up, down), and 8192 x 8192.
KN = ((4096, 6144), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344), (28672, 8192), (8192, 8192))
QUANT_SHAPES = ((1024, 4096), (4096, 4096), (8192, 8192), (4096, 14336))
R = 8  # distinct operand sets per timed program


def _fp8(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -1.5, 1.5).astype(jnp.float8_e4m3fn)


def large_m_config(m, k, n):
    """`tuned_block_sizes.launch_config` where the default schedule is another one, else None."""
    if tbs.small_m_config(m, k, n, 2, platform.num_sms()) is None:
        return None
    return tbs.launch_config(m, k, n, 2, platform.num_sms())


def check_gemm(results, overlapped: bool):
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
        ref = reference.scaled_mm(a, b, sa, sb, bias)
        schedules = dict(default=None, large_m=large_m_config(m, k, n))
        if overlapped:
            schedules["overlapped"] = tbs.overlapped_config(m, k, n, 2, platform.num_sms())
        for name, config in schedules.items():  # the default, then the other schedules
            if name == "large_m" and config is None:
                continue
            try:
                out = jax.jit(gpu_mm.scaled_mm, static_argnums=5, static_argnames="config")(
                    a, b, sa, sb, bias, out_dtype, config=config
                )
                out64 = np.asarray(out).astype(np.float64)
                err = float(np.abs(out64 - ref).max() / np.abs(ref).max())
                failure = None
            except Exception as e:  # a failing schedule is reported, not fatal
                out64, err, failure = None, None, f"{type(e).__name__}: {str(e)[:300]}"
            tol = reference.gemm_tolerance(k, out_dtype)
            ok = failure is None and bool(np.isfinite(out64).all() and err <= tol)
            entry = dict(kind="gemm_check", m=m, k=k, n=n, scales=scales, bias=with_bias, schedule=name)
            entry.update(out_dtype=jnp.dtype(out_dtype).name, err=err, tol=tol, ok=ok, error=failure)
            results.append(entry)
            print(
                f"check gemm {m}x{k}x{n} {scales} bias={with_bias} {jnp.dtype(out_dtype).name} {name}: "
                f"err {err} tol {tol:.3g} {'OK' if ok else 'FAIL ' + str(failure)}",
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
    # cuBLASLt's fp8 kernel at 8192^3 on the H200 (Nsight Compute): 128x128x128 CTAs, 6 stages.
    "cm_s6": tbs.GemmConfig(cluster="m", stages=6, epi_tile_n=32),
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


def _gemm_sets(key, m, k, n, r):
    """R distinct operand sets `(a (M, K) fp8, w (N, K) fp8, scale_a (M, 1), scale_w (N, 1))` with
    random codes and scales: every timed call reads its own activation and weight."""
    sets = []
    for kk in jax.random.split(jax.random.fold_in(key, m * 131 + k * 7 + n), r):
        ka, kw, ks, kt = jax.random.split(kk, 4)
        sets.append(
            (
                _fp8(ka, (m, k)),
                _fp8(kw, (n, k)),
                jax.random.uniform(ks, (m, 1), jnp.float32, 0.01, 0.03),
                jax.random.uniform(kt, (n, 1), jnp.float32, 0.005, 0.015),
            )
        )
    return sets


def plan_gemm(m, k, n, per_tensor):
    """The GEMM `Fp8LinearOp`'s plan names for fp8 input `(m, k)` and an `(n, k)` weight."""
    scheme = w8a8_jax.Fp8Scheme.from_names(
        "tensor" if per_tensor else "channel", "static" if per_tensor else "dynamic-token"
    )
    return dispatch.plan(
        scheme,
        input_shape=(m, k),
        input_dtype=jnp.float8_e4m3fn,
        weight_shape=(n, k),
        weight_dtype=jnp.float8_e4m3fn,
        out_dtype=jnp.bfloat16,
        kernel=platform.fused_kernel(),
    ).gemm


def _agreement(ours, theirs) -> float:
    """Max |ours - theirs| over max |theirs| of two (M, N) outputs (one JAX, one torch)."""
    a = torch.from_dlpack(jax.block_until_ready(ours.astype(jnp.float32))).double()
    b = theirs.double()
    return float((a - b).abs().max() / b.abs().max())


def bench_gemm(results, m_values, kn_values, args, configs, save):
    """One row per (M, K, N): our kernel (rowwise; per-tensor at M >= 1024), XLA's fp8 GEMMs, XLA
    bf16, then torch's rowwise, per-tensor and bf16 GEMMs on the same operands, then JAX again
    (`timing.compare`). The plan's pick is recorded beside them. Without torch its rows are
    left out (`torch: "not installed"`)."""
    key = jax.random.key(2)
    deadline = time.perf_counter() + args.time_budget
    for k, n in kn_values:
        for m in m_values:
            if time.perf_counter() > deadline:
                results.append(dict(kind="gemm_skipped", m=m, k=k, n=n, why="time budget"))
                continue
            sets = _gemm_sets(key, m, k, n, args.r)
            bf16_sets = [(a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) for a, w, _, _ in sets]
            unit = jnp.array([0.01], jnp.float32)
            row = dict(kind="gemm", m=m, k=k, n=n, r=args.r, calls=args.calls, repeats=args.reps)
            row["plan_rowwise"] = plan_gemm(m, k, n, per_tensor=False)
            row["plan_tensor"] = plan_gemm(m, k, n, per_tensor=True)

            def ours(config=None):
                return timing.Variant(
                    lambda a, w, sa, sw: gpu_mm.scaled_mm(a, w, sa, sw, None, jnp.bfloat16, config=config), sets
                )

            jax_variants = {
                "ours_rowwise": ours(),
                "xla_rowwise": timing.Variant(
                    lambda a, w, sa, sw: scaled_mm.xla_per_token_w8a8_scaled_mm(a, w, sa, sw, None, jnp.bfloat16), sets
                ),
                "xla_tensor": timing.Variant(
                    lambda a, w, sa, sw: scaled_mm.xla_per_tensor_w8a8_scaled_mm(a, w, unit, unit, None, jnp.bfloat16),
                    sets,
                ),
                "xla_bf16": timing.Variant(
                    lambda a, w: jax.lax.dot_general(a, w, layout.CONTRACT_K, preferred_element_type=jnp.bfloat16),
                    bf16_sets,
                ),
            }
            if m >= 1024:  # per-tensor scales run the same kernel; timed where it is compute-bound
                jax_variants["ours_tensor"] = timing.Variant(
                    lambda a, w, sa, sw: gpu_mm.scaled_mm(a, w, unit, unit, None, jnp.bfloat16), sets
                )
            default = tbs.default_config(m, k, n, 2, platform.num_sms())
            row["schedule"] = dict(k_splits=default.k_splits, swap_ab=default.swap_ab)
            large_m = large_m_config(m, k, n)
            if large_m is not None:
                jax_variants["ours_large_m"] = ours(large_m)
            if args.overlapped:
                jax_variants["ours_overlapped"] = ours(tbs.overlapped_config(m, k, n, 2, platform.num_sms()))
            for name, config in configs.items():
                jax_variants[name] = ours(config)
            if args.only:
                jax_variants = {name: v for name, v in jax_variants.items() if name in args.only}
            if torch is None:
                torch_variants, row["torch"] = {}, "not installed"
            else:
                torch_variants = _torch_variants(sets, bf16_sets, unit, row)
                if args.only:
                    torch_variants = {name: v for name, v in torch_variants.items() if name in args.only}
            row["times"] = timing.compare(
                jax_variants, torch_variants, calls=args.calls, repeats=args.reps, cupti=not args.skip_cupti
            )
            row["derived"] = derived(row)
            results.append(row)
            print(json.dumps(dict(m=m, k=k, n=n, **row["derived"])), flush=True)
            save()


def _torch_variants(sets, bf16_sets, unit, row) -> dict:
    """torch's rowwise, per-tensor and bf16 GEMMs on the JAX operands (DLPack), and in `row` how
    closely torch's rowwise output agrees with the kernel's on the first set."""
    t_sets = [tuple(timing.to_torch(x) for x in s) for s in sets]
    t_bf16 = [tuple(timing.to_torch(x) for x in s) for s in bf16_sets]
    t_unit = timing.to_torch(unit).reshape(())
    variants = {
        "torch_rowwise": timing.Variant(
            lambda a, w, sa, sw: torch._scaled_mm(a, w.t(), sa, sw.view(1, -1), out_dtype=torch.bfloat16),
            t_sets,
        ),
        "torch_tensor": timing.Variant(
            lambda a, w, sa, sw: torch._scaled_mm(a, w.t(), t_unit, t_unit, out_dtype=torch.bfloat16), t_sets
        ),
        "torch_bf16": timing.Variant(lambda a, w: torch.mm(a, w.t()), t_bf16),
    }
    try:  # the same numbers on both sides, or the ratios mean nothing
        a, w, sa, sw = sets[0]
        ta, tw, tsa, tsw = t_sets[0]
        row["agreement"] = _agreement(
            gpu_mm.scaled_mm(a, w, sa, sw, None, jnp.bfloat16),
            torch._scaled_mm(ta, tw.t(), tsa, tsw.view(1, -1), out_dtype=torch.bfloat16),
        )
    except Exception as err:
        row["agreement_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return variants


def derived(row) -> dict:
    """A GEMM row's TFLOP/s (wall clock, and CUPTI for JAX), weight TB/s at M <= 64 (the bytes a
    decode GEMM must read), and the ratios the targets are stated in (torch time / our time: above
    1 we lead)."""
    out = timing.gemm_figures(row["times"], row["m"], row["k"], row["n"])
    wall = timing.wall_times(row["times"])
    # The timed variant that runs what the plan picked (per-tensor scales on the kernel: its
    # per-tensor row where it was timed).
    plan = {f"plan_{g}": _PLAN_VARIANTS.get(row.get(f"plan_{g}")) for g in ("rowwise", "tensor")}
    if plan["plan_tensor"] == "ours_rowwise" and "ours_tensor" in wall:
        plan["plan_tensor"] = "ours_tensor"
    ratios = {}
    for mine, theirs in (
        ("ours_rowwise", "torch_rowwise"),
        ("ours_tensor", "torch_tensor"),
        ("plan_rowwise", "torch_rowwise"),
        ("plan_tensor", "torch_tensor"),
        ("xla_bf16", "torch_bf16"),
        ("ours_large_m", "torch_rowwise"),
        ("ours_rowwise", "ours_large_m"),
        ("ours_overlapped", "torch_rowwise"),
        ("ours_overlapped", "ours_rowwise"),
    ):
        timed = plan.get(mine, mine)
        if timed in wall and theirs in wall:
            ratios[f"{mine}/{theirs}"] = wall[theirs] / wall[timed]
    out["ratios"] = ratios
    out["plan_variants"] = plan
    return out


# The timed variant that runs what each of the plan's GEMM names runs.
_PLAN_VARIANTS = {
    scaled_mm.fused_w8a8_scaled_mm.__name__: "ours_rowwise",
    scaled_mm.xla_per_token_w8a8_scaled_mm.__name__: "xla_rowwise",
    scaled_mm.xla_per_tensor_w8a8_scaled_mm.__name__: "xla_tensor",
}


def _per_token_any_amax(x):
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    scale = jnp.maximum(quantization.true_divide(amax, jnp.float32(448)), jnp.float32(1 / (448 * 512)))
    return jnp.clip(quantization.true_divide(x, scale), -448, 448).astype(jnp.float8_e4m3fn), scale


def bench_quant(results, shapes, args, save):
    """Per-token quant (bf16 in): ours, XLA's formula, the other schemes' XLA quant, and a bf16 copy
    in the same `timing.compare` (JAX only), in bytes/s: (2 + 1) bytes an element + 4 a row; the
    copy moves 4 bytes an element."""
    key = jax.random.key(3)
    for m, k in shapes:
        keys = jax.random.split(jax.random.fold_in(key, m * k), args.r)
        xs = [(jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16),) for kk in keys]
        variants = {
            "xla": lambda x: quantization.quantize_per_token(x, None, jnp.float8_e4m3fn),
            # The other two schemes, XLA-fused, for the note's "would a kernel help" question.
            "xla_static": lambda x: quantization.scaled_fp8_quant(x, jnp.array([0.01], jnp.float32))[0],
            "xla_dynamic_tensor": lambda x: quantization.scaled_fp8_quant(x)[0],
            # The per-token formula with the amax over every value (NaN and Inf included): prices
            # the finite mask.
            "xla_any_amax": _per_token_any_amax,
            "copy": lambda x: x + jnp.bfloat16(1),  # reads and writes 2 bytes an element
        }
        if gpu_quant is not None:
            variants["ours"] = lambda x: gpu_quant.per_token_quant(x, None, jnp.float8_e4m3fn)
        times = timing.compare(
            {name: timing.Variant(fn, xs) for name, fn in variants.items()},
            {},
            calls=args.calls,
            repeats=args.reps,
            cupti=not args.skip_cupti,
        )
        moved = {name: 4 * m * k if name == "copy" else m * k * 3 + m * 4 for name in variants}
        row = dict(kind="quant", m=m, k=k, r=args.r, times=times)
        row["TBps"] = {n: moved[n] / t["wall_s"] / 1e12 for n, t in times.items() if t.get("wall_s")}
        row["cupti_TBps"] = {n: moved[n] / t["cupti_s"] / 1e12 for n, t in times.items() if t.get("cupti_s")}
        if row["TBps"].get("ours") and row["TBps"].get("copy"):
            row["ours_over_copy"] = row["TBps"]["ours"] / row["TBps"]["copy"]
        results.append(row)
        print(json.dumps(dict(m=m, k=k, TBps=row["TBps"])), flush=True)
        save()


def bench_e2e(results, m_values, kn_values, args, save):
    """`Fp8LinearOp.apply` (bf16 in, dynamic per-token, per-channel weight, bf16 out) as the plan
    runs it, and with `fused_supported=False` (XLA's quant and GEMM), against XLA's bf16 GEMM on the
    same weights (their bf16 copy)."""
    key = jax.random.key(5)
    fused = w8a8_jax.Fp8LinearOp(use_per_token_if_dynamic=True, pad_output=False)
    xla = w8a8_jax.Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True, pad_output=False)
    for k, n in kn_values:
        kw = jax.random.fold_in(key, k * n)
        qws = [_fp8(kk, (n, k)) for kk in jax.random.split(kw, args.r)]
        w_scale = jnp.full((n, 1), 5e-4, jnp.float32)
        for m in m_values:
            keys = jax.random.split(jax.random.fold_in(kw, m), args.r)
            xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in keys]
            fp8_sets = list(zip(xs, qws))
            bf16_sets = [(x, (qw.astype(jnp.float32) * 5e-4).astype(jnp.bfloat16)) for x, qw in fp8_sets]
            variants = {
                "xla_bf16": timing.Variant(
                    lambda x, w: jax.lax.dot_general(x, w, layout.CONTRACT_K, preferred_element_type=jnp.bfloat16),
                    bf16_sets,
                ),
                "op_plan": timing.Variant(lambda x, qw: fused.apply(x, qw, w_scale), fp8_sets),
                "op_xla": timing.Variant(lambda x, qw: xla.apply(x, qw, w_scale), fp8_sets),
            }
            times = timing.compare(variants, {}, calls=args.calls, repeats=args.reps, cupti=not args.skip_cupti)
            plan = fused.plan(xs[0], qws[0], w_scale)
            row = dict(kind="e2e", m=m, k=k, n=n, r=args.r, times=times, plan=[plan.quantizer, plan.gemm])
            flops = 2.0 * m * n * k
            row["tflops"] = {v: flops / t["wall_s"] / 1e12 for v, t in times.items() if t.get("wall_s")}
            if "xla_bf16" in row["tflops"]:
                row["over_bf16"] = {v: t / row["tflops"]["xla_bf16"] for v, t in row["tflops"].items()}
            results.append(row)
            print(json.dumps(dict(m=m, k=k, n=n, tflops=row["tflops"])), flush=True)
            save()


def print_table(results):
    """The short table: wall-clock figures (TFLOP/s, or weight TB/s at M <= 64) and the ratios."""
    print("\nGEMM, bf16 out, wall clock: TFLOP/s (M <= 64: weight TB/s); ratio = torch time / ours")
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'ours_row':>8} {'ours_t':>7} {'large_m':>7} {'overlap':>7} {'xla_row':>7} "
        f"{'xla_t':>7} {'bf16':>7} {'tch_row':>7} {'tch_t':>7} {'tch_bf':>7} | {'plan':>6} {'pl/row':>6} "
        f"{'pl/t':>6} {'row/lg':>6} {'ov/row':>6} {'drift':>6}"
    )
    cols = ["ours_rowwise", "ours_tensor", "ours_large_m", "ours_overlapped", "xla_rowwise", "xla_tensor", "xla_bf16"]
    cols += ["torch_rowwise", "torch_tensor", "torch_bf16"]
    for r in results:
        if r["kind"] != "gemm":
            continue
        d = r["derived"]
        figures = d["weight_tbps"] if r["m"] <= 64 else d["tflops"]
        cells = " ".join(f"{figures[c]:7.1f}" if c in figures else f"{'-':>7}" for c in cols)
        ratios = d["ratios"]
        plan = {"ours_rowwise": "kernel", "xla_rowwise": "xla", "xla_tensor": "xla"}.get(
            d["plan_variants"]["plan_rowwise"], "?"
        )
        pr, pt = (
            ratios.get("plan_rowwise/torch_rowwise", float("nan")),
            ratios.get("plan_tensor/torch_tensor", float("nan")),
        )
        small = ratios.get("ours_rowwise/ours_large_m", float("nan"))
        overlap = ratios.get("ours_overlapped/torch_rowwise", float("nan"))
        drift = d["max_drift"] if d["max_drift"] is not None else float("nan")
        print(
            f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells} | {plan:>6} {pr:6.2f} {pt:6.2f} {small:6.2f} "
            f"{overlap:6.2f} {drift:6.1%}"
        )
    extra = sorted({c for r in results if r["kind"] == "gemm" for c in r["times"] if c in EXPLORE})
    if extra:
        print("\nconfigs explored, wall clock TFLOP/s")
        for r in results:
            if r["kind"] == "gemm":
                cells = " ".join(f"{c}={r['derived']['tflops'][c]:.0f}" for c in extra if c in r["derived"]["tflops"])
                print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells}")
    quant = [r for r in results if r["kind"] == "quant"]
    if quant:
        print("\nper-token quant, bf16 in, TB/s, wall clock (CUPTI)")
        for r in quant:
            cells = " ".join(
                f"{name} {v:5.2f} ({r['cupti_TBps'].get(name, float('nan')):5.2f})" for name, v in r["TBps"].items()
            )
            print(f"{r['m']:>5} x {r['k']:>6}: {cells} | ours/copy {r.get('ours_over_copy', float('nan')):.2f}")
    e2e = [r for r in results if r["kind"] == "e2e"]
    if e2e:
        print("\nFp8LinearOp.apply end to end (bf16 in, per-token), wall clock TFLOP/s, and over XLA bf16")
        for r in e2e:
            cells = " ".join(f"{name} {v:7.1f}" for name, v in r["tflops"].items())
            over = r.get("over_bf16", {}).get("op_plan", float("nan"))
            print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells} | plan/bf16 {over:.2f} {r['plan']}")
    checks = [r for r in results if r["kind"].endswith("_check")]
    print(f"\nchecks: {sum(bool(r.get('ok', r.get('identical'))) for r in checks)}/{len(checks)} passed")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--reps", type=int, default=timing.REPEATS, help="samples per figure (median, spread)")
    parser.add_argument("--calls", type=int, default=timing.CALLS, help="back-to-back calls per sample")
    parser.add_argument("--r", type=int, default=R, help="distinct operand sets per call")
    parser.add_argument("--skip-quant", action="store_true")
    parser.add_argument("--skip-cupti", action="store_true")
    parser.add_argument("--explore", action="store_true", help="also time every candidate config")
    parser.add_argument("--configs", nargs="+", choices=sorted(EXPLORE), default=[], help="also time these configs")
    parser.add_argument(
        "--only", nargs="+", help="time only these variants (e.g. ours_rowwise xla_rowwise torch_rowwise)"
    )
    parser.add_argument("--ms", type=int, nargs="+", help="M values (default: the full list)")
    parser.add_argument("--kn", type=int, nargs=2, action="append", help="a (K, N) pair; repeatable")
    parser.add_argument("--quant-shapes", type=int, nargs=2, action="append", help="an (M, K) of the quant rows")
    parser.add_argument("--overlapped", action="store_true", help="also check and time overlapped promotion")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also time Fp8LinearOp.apply against XLA bf16")
    parser.add_argument("--e2e-ms", type=int, nargs="+", default=[4096], help="M values of the end-to-end rows")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds of GEMM rows; the rest are skipped")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_kernels.json"))
    args = parser.parse_args(argv)
    configs = dict(EXPLORE) if args.explore else {name: EXPLORE[name] for name in args.configs}
    device = jax.devices()[0]
    results = []
    header = dict(
        kind="run",
        command="python3 benchmarks/gpu_kernels.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        device=device.device_kind,
        jax=jax.__version__,
    )
    results.append(header)
    print(header, flush=True)

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    if not args.skip_checks:
        check_gemm(results, args.overlapped)
        if not args.skip_quant and gpu_quant is not None:
            check_quant(results)
        if configs:
            check_configs(results, configs)
        save()
    ms = args.ms or ((1, 16, 4096) if args.quick else M_VALUES)
    kns = [tuple(kn) for kn in args.kn] if args.kn else (((4096, 28672), (8192, 8192)) if args.quick else KN)
    if not args.skip_gemm:
        bench_gemm(results, ms, kns, args, configs, save)
    if args.e2e:
        bench_e2e(results, args.e2e_ms, kns, args, save)
    if not args.skip_quant:
        bench_quant(results, [tuple(s) for s in args.quant_shapes] if args.quant_shapes else QUANT_SHAPES, args, save)
    save()
    print_table(results)
    return results


if __name__ == "__main__":
    main()
