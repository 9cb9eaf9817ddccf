"""Hopper block-scaled fp8 GEMM (DeepSeek-V3's 1x128 activation groups, 128x128 weight blocks):
check it, then time it against XLA's block path, XLA bf16 and torch's blockwise `_scaled_mm`.

One run, one device: the kernel against the float64 reference first (odd M, K and N off the
blocks, bias, every out dtype, K up to 18432), then per (M, K, N) one row of `timing.compare` on
the same operands: the kernel (`kernels.gpu.block_scaled_mm`) under its default schedule
(`tuned_block_sizes.default_config`: where the tiles underfill the SMs, the swapped decode schedule
at M <= 64, K split above) and, where that differs, `ours_large_m`, the large-M schedule
(`launch_config`), `ours_wide`, the rowwise kernel's wide 128x256 CTA where the block kernel's
narrow one differs, `ours_pipelined_scales` (the default with the weight-block scales through the
pipeline, `GemmConfig.pipelined_weight_scales`), and with `--overlapped` `ours_overlapped`
(overlapped promotion, measured 3x slower), each checked first too (`--lean` times the default
schedule alone, and no XLA block path); XLA's block path (`w8a8_block_fp8_matmul` without the block
kernel: dequantized or per-k-block GEMMs) and XLA bf16 on the codes' bf16 copy, then `torch._scaled_mm` blockwise and `torch.mm` bf16 on the very same arrays
(DLPack; fp8 as a uint8 view), then the JAX variants again. Then the group quant (bf16 in): the
kernel (`kernels.gpu.group_quant`), XLA's formula and a bf16 copy, in bytes/s. With `--e2e`,
`W8A8BlockFp8LinearOp.apply` (bf16 in: the group quant, then the GEMM) with both kernels in the
plan (as registered), with the GEMM kernel after XLA's quant formula and with neither, against XLA bf16, with the kernels each program launches (from its optimized
HLO: whether the scales' transpose between quant and GEMM is a kernel of its own).

torch's blockwise call (torch 2.11 on sm90): `torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb,
out_dtype=torch.bfloat16)` with `a (M, K)` and `w (N, K)` e4m3fn, `sa` the `(M, KB)` activation
scales stored k-block-major (the `(KB, M)` array, `.t()`), `sb` the `(NB, KB)` weight scales
passed as `.t()`.

  python3 benchmarks/block_kernel.py [--quick] [--ms M ...] [--kn K N ...] [--reps N] [--calls N]
                                     [--r N] [--e2e] [--overlapped] [--lean] [--skip-checks] [--skip-quant] [--skip-cupti]
                                     [--time-budget S] [--json PATH]

Timing as in `gpu_kernels.py` (`timing.compare`): R (`--r`, default 8) distinct operand sets per
jitted program, wall clock over `--calls` back-to-back calls blocked once, median of `--reps`
samples, JAX before and after torch, CUPTI beside. Prints a short table last; everything goes to
`$OUT/block_kernel.json` (or `--json`), rewritten after every row.
"""

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
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
from w8a8_jax import layout, platform, quantization
from w8a8_jax.kernels import gpu
from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block
from w8a8_jax.kernels.gpu import group_quant
from w8a8_jax.kernels.gpu import tuned_block_sizes as tbs

try:
    import torch
except ImportError:  # the torch rows are then left out, and said so
    torch = None

BLOCK = (128, 128)
M_VALUES = (1, 16, 64, 128, 1024, 4096, 8192)
# DeepSeek-V3's block-fp8 layer shapes (K, N): e.g. 7168 x 2112 its fused q_a / kv_a projections,
# 1536 x 24576 q_b, 16384 x 7168 the attention output, 18432 x 7168 the dense MLP's down projection.
KN = ((7168, 2112), (7168, 24576), (1536, 24576), (16384, 7168), (7168, 18432), (18432, 7168), (2048, 7168))
QUICK_MS = (1, 128, 4096)
QUICK_KN = ((7168, 2112), (7168, 24576))
QUANT_SHAPES = ((1024, 7168), (4096, 7168), (8192, 7168), (4096, 18432))  # (M, K)
R = 8


def no_block_kernels(kernel):
    """The Hopper kernel without its block GEMM and group quant: the plan then runs XLA's block path."""
    return dataclasses.replace(kernel, block_scaled_mm=None, per_token_group_quant=None)


CHECKS = (  # (M, K, N, bias, out dtype)
    (1, 7168, 2112, True, jnp.bfloat16),
    (16, 1536, 640, False, jnp.float16),
    (130, 2048, 1024, True, jnp.bfloat16),
    (300, 4100, 2000, True, jnp.bfloat16),  # K and N off the blocks: partial last blocks
    (1024, 7168, 512, False, jnp.float32),
    (256, 18432, 512, False, jnp.float32),  # the longest K: float32 promotion
)


def _codes(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -1.5, 1.5).astype(jnp.float8_e4m3fn)


def block_sets(key, m, k, n, r):
    """R distinct `(a (M, K), w (N, K), scale_a (M, KB), scale_b (NB, KB))` with random codes and
    scales: every timed call reads its own activation and weight."""
    kb, nb = layout.num_blocks(k, BLOCK[1]), layout.num_blocks(n, BLOCK[0])
    sets = []
    for kk in jax.random.split(jax.random.fold_in(key, m * 131 + k * 7 + n), r):
        ka, kw, ks, kt = jax.random.split(kk, 4)
        sets.append(
            (
                _codes(ka, (m, k)),
                _codes(kw, (n, k)),
                jax.random.uniform(ks, (m, kb), jnp.float32, 0.01, 0.03),
                jax.random.uniform(kt, (nb, kb), jnp.float32, 0.005, 0.015),
            )
        )
    return sets


def ours(a, w, sa, sb, bias=None, out_dtype=jnp.bfloat16, config=None):
    return gpu_block.block_scaled_mm(a, w, sa, sb, BLOCK, bias, out_dtype, config=config)


def padded(m, k, n):
    """`(M, K, N)` as the block kernel runs them: K and N padded to the blocks."""
    return m, layout.round_up(k, BLOCK[1]), layout.round_up(n, BLOCK[0])


def large_m_config(m, k, n):
    """`tuned_block_sizes.launch_config` for the block kernel's padded K and N where the default
    schedule is another one (the tiles underfill the SMs), else None."""
    if tbs.small_m_config(*padded(m, k, n), 2, platform.num_sms(), block_scales=True) is None:
        return None
    return tbs.launch_config(*padded(m, k, n), 2, platform.num_sms(), block_scales=True)


def wide_config(m, k, n):
    """The rowwise kernel's large-M tiles (the wide 128x256 CTA where its rule takes it) where they
    differ from the block kernel's large-M schedule (always the narrow CTA), else None."""
    wide = tbs.launch_config(*padded(m, k, n), 2, platform.num_sms())
    return None if wide == tbs.launch_config(*padded(m, k, n), 2, platform.num_sms(), block_scales=True) else wide


def _schedule(config) -> dict:
    return dict(
        k_splits=config.k_splits,
        swap_ab=config.swap_ab,
        overlap_promotion=config.overlap_promotion,
        pipelined_weight_scales=config.pipelined_weight_scales,
        cta=[config.cta_m, config.cta_n],
        stages=config.stages,
    )


def xla_block(a, w, sa, sb):
    """XLA's block GEMM: the plan's path without the block kernel (dequantized or per-k-block GEMMs)."""
    with platform.override(fused_kernel=no_block_kernels(gpu.FUSED_KERNEL)):
        return w8a8_jax.w8a8_block_fp8_matmul(a, w, sa, sb, list(BLOCK), jnp.bfloat16)


def xla_bf16(a, w):
    return jax.lax.dot_general(a, w, layout.CONTRACT_K, preferred_element_type=jnp.bfloat16)


def pipelined_config(m, k, n):
    """The default schedule with the weight-block scales through the pipeline."""
    config = tbs.default_config(*padded(m, k, n), 2, platform.num_sms(), block_scales=True)
    return dataclasses.replace(config, pipelined_weight_scales=True)


def check_block(results, overlapped: bool):
    """The kernel against the float64 reference, every row and column."""
    key = jax.random.key(0)
    for m, k, n, with_bias, out_dtype in CHECKS:
        key, kbias = jax.random.split(key)
        a, w, sa, sb = block_sets(key, m, k, n, 1)[0]
        bias = jax.random.normal(kbias, (n,), jnp.float32).astype(out_dtype) if with_bias else None
        ref = reference.block_scaled_mm(a, w, sa, sb, BLOCK, bias)
        # The default, then the other schedules: large-M where the default differs, the wide CTA
        # where it differs from that, the weight scales pipelined, overlapped promotion.
        configs = [None, large_m_config(m, k, n), wide_config(m, k, n), pipelined_config(m, k, n)]
        if overlapped:
            configs.append(tbs.overlapped_config(*padded(m, k, n), 2, platform.num_sms()))
        for config in dict.fromkeys(configs):
            entry = dict(kind="block_check", m=m, k=k, n=n, bias=with_bias, out_dtype=jnp.dtype(out_dtype).name)
            entry["schedule"] = "default" if config is None else _schedule(config)
            try:
                run = jax.jit(ours, static_argnums=(5, 6))
                out = np.asarray(run(a, w, sa, sb, bias, out_dtype, config), np.float64)
                err, tol = float(np.abs(out - ref).max() / np.abs(ref).max()), reference.gemm_tolerance(k, out_dtype)
                entry.update(err=err, tol=tol, ok=bool(np.isfinite(out).all() and err <= tol))
            except Exception as err:  # a failing case is reported, not fatal
                entry.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
            results.append(entry)
            print(json.dumps(entry), flush=True)


def _torch_variants(sets, bf16_sets, row) -> dict:
    """torch's blockwise and bf16 GEMMs on the JAX operands (DLPack), and in `row` how closely
    torch's blockwise output agrees with the kernel's on the first set."""
    t_sets = [
        (timing.to_torch(a), timing.to_torch(w), timing.to_torch(sa.T), timing.to_torch(sb)) for a, w, sa, sb in sets
    ]
    t_bf16 = [tuple(timing.to_torch(x) for x in s) for s in bf16_sets]
    variants = {
        "torch_block": timing.Variant(
            lambda a, w, sa_t, sb: torch._scaled_mm(
                a, w.t(), scale_a=sa_t.t(), scale_b=sb.t(), out_dtype=torch.bfloat16
            ),
            t_sets,
        ),
        "torch_bf16": timing.Variant(lambda a, w: torch.mm(a, w.t()), t_bf16),
    }
    try:  # the same numbers on both sides, or the ratios mean nothing
        a, w, sa_t, sb = t_sets[0]
        theirs = torch._scaled_mm(a, w.t(), scale_a=sa_t.t(), scale_b=sb.t(), out_dtype=torch.bfloat16).double()
        mine = torch.from_dlpack(jax.block_until_ready(ours(*sets[0]).astype(jnp.float32))).double()
        row["agreement"] = float((mine - theirs).abs().max() / theirs.abs().max())
    except Exception as err:
        row["agreement"] = f"{type(err).__name__}: {str(err)[:300]}"
    return variants


def derived(row) -> dict:
    """TFLOP/s (wall clock, and CUPTI for JAX), weight TB/s at M <= 64, and the ratios the targets
    are stated in (their time / ours: above 1 we lead)."""
    out = timing.gemm_figures(row["times"], row["m"], row["k"], row["n"])
    wall = timing.wall_times(row["times"])
    pairs = (("ours_block", "torch_block"), ("ours_block", "xla_block"), ("op_kernel", "xla_bf16"))
    pairs += (("op_xla_quant", "xla_bf16"),)
    pairs += (("ours_large_m", "torch_block"), ("ours_block", "ours_large_m"))
    pairs += (("ours_wide", "torch_block"), ("ours_block", "ours_wide"))
    pairs += (("ours_pipelined_scales", "torch_block"), ("ours_pipelined_scales", "ours_block"))
    pairs += (("ours_overlapped", "torch_block"), ("ours_overlapped", "ours_block"))
    pairs += (("op_xla", "xla_bf16"), ("xla_bf16", "torch_bf16"))
    out["ratios"] = {f"{a}/{b}": wall[b] / wall[a] for a, b in pairs if a in wall and b in wall}
    return out


def schedule_variants(m, k, n, sets) -> dict:
    """The block kernel on its other schedules, where they differ from the default: the large-M one,
    the rowwise kernel's wide CTA and the pipelined weight scales."""
    variants = {}
    large_m = large_m_config(m, k, n)
    if large_m is not None:
        variants["ours_large_m"] = timing.Variant(functools.partial(ours, config=large_m), sets)
    wide = wide_config(m, k, n)
    if wide is not None:
        variants["ours_wide"] = timing.Variant(functools.partial(ours, config=wide), sets)
    pipelined = pipelined_config(m, k, n)
    variants["ours_pipelined_scales"] = timing.Variant(functools.partial(ours, config=pipelined), sets)
    return variants


def bench_block(results, ms, kns, args, save):
    key = jax.random.key(2)
    deadline = time.perf_counter() + args.time_budget
    for k, n in kns:
        for m in ms:
            if time.perf_counter() > deadline:
                results.append(dict(kind="block_skipped", m=m, k=k, n=n, why="time budget"))
                continue
            sets = block_sets(key, m, k, n, args.r)
            bf16_sets = [(a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) for a, w, _, _ in sets]
            row = dict(kind="block", m=m, k=k, n=n, r=args.r, calls=args.calls, repeats=args.reps)
            jax_variants = {
                "ours_block": timing.Variant(ours, sets),
                "xla_block": timing.Variant(xla_block, sets),
                "xla_bf16": timing.Variant(xla_bf16, bf16_sets),
            }
            row["schedule"] = _schedule(tbs.default_config(*padded(m, k, n), 2, platform.num_sms(), block_scales=True))
            if args.lean:  # the targets' columns only: the default schedule, XLA bf16 and torch
                del jax_variants["xla_block"]
            else:
                jax_variants.update(schedule_variants(m, k, n, sets))
            if args.overlapped:
                overlapped = tbs.overlapped_config(*padded(m, k, n), 2, platform.num_sms())
                jax_variants["ours_overlapped"] = timing.Variant(functools.partial(ours, config=overlapped), sets)
            if torch is None:
                torch_variants, row["torch"] = {}, "not installed"
            else:
                torch_variants = _torch_variants(sets, bf16_sets, row)
            row["times"] = timing.compare(
                jax_variants, torch_variants, calls=args.calls, repeats=args.reps, cupti=not args.skip_cupti
            )
            row["derived"] = derived(row)
            results.append(row)
            print(json.dumps(dict(m=m, k=k, n=n, **row["derived"])), flush=True)
            save()


def bench_e2e(results, ms, kns, args, save):
    """`W8A8BlockFp8LinearOp.apply` (bf16 in, bf16 out) on three registrations: the block GEMM and
    the group quant kernels as registered (`op_kernel`), the GEMM kernel after XLA's group quant
    formula (`op_xla_quant`), neither (`op_xla`: XLA's block path), against XLA bf16 on the weights'
    bf16 copy."""
    key = jax.random.key(5)
    op = w8a8_jax.W8A8BlockFp8LinearOp()
    registrations = {
        "op_kernel": gpu.FUSED_KERNEL,
        "op_xla_quant": dataclasses.replace(gpu.FUSED_KERNEL, per_token_group_quant=None),
        "op_xla": no_block_kernels(gpu.FUSED_KERNEL),
    }
    for k, n in kns:
        kw = jax.random.fold_in(key, k * n)
        weights = [(w, sb) for _, w, _, sb in block_sets(kw, 1, k, n, args.r)]
        for m in ms:
            keys = jax.random.split(jax.random.fold_in(kw, m), args.r)
            inputs = [(jax.random.normal(kk, (m, k), jnp.bfloat16), w, sb) for kk, (w, sb) in zip(keys, weights)]
            bf16_sets = [(x, w.astype(jnp.bfloat16)) for x, w, _ in inputs]

            def apply(x, w, sb):
                return op.apply(x, w, sb, out_dtype=jnp.bfloat16)

            row = dict(kind="block_e2e", m=m, k=k, n=n, r=args.r, times={}, plans={}, launches={})
            for name, kernel in registrations.items():
                with platform.override(fused_kernel=kernel):
                    plan = op.plan(*inputs[0])
                    row["plans"][name] = [plan.quantizer, plan.gemm]
                    row["times"].update(
                        timing.compare(
                            {name: timing.Variant(apply, inputs)},
                            {},
                            calls=args.calls,
                            repeats=args.reps,
                            cupti=not args.skip_cupti,
                        )
                    )
                    # A fresh function: jit's trace cache does not see the override.
                    hlo = jax.jit(lambda *xs: apply(*xs)).lower(*inputs[0]).compile().as_text()
                    row["launches"][name] = entry_kernels(hlo)
            row["times"].update(
                timing.compare(
                    {"xla_bf16": timing.Variant(xla_bf16, bf16_sets)},
                    {},
                    calls=args.calls,
                    repeats=args.reps,
                    cupti=not args.skip_cupti,
                )
            )
            row["derived"] = derived(row)
            results.append(row)
            print(json.dumps(dict(m=m, k=k, n=n, plans=row["plans"], **row["derived"])), flush=True)
            save()


def bench_group_quant(results, shapes, args, save):
    """Per-token-group quant (bf16 in, groups of 128): the kernel, XLA's formula and a bf16 copy in
    one `timing.compare` (JAX only), in bytes/s: 2 + 1 bytes an element and 4 a group; the copy
    moves 4 bytes an element. The kernel's codes and scales are checked bit for bit first."""
    key = jax.random.key(3)
    for m, k in shapes:
        keys = jax.random.split(jax.random.fold_in(key, m * k), args.r)
        xs = [(jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16),) for kk in keys]
        variants = {
            "ours": lambda x: group_quant.per_token_group_quant(x, BLOCK[1], jnp.float8_e4m3fn),
            "xla": lambda x: quantization.quantize_per_token_group(x, BLOCK[1], jnp.float8_e4m3fn),
            "copy": lambda x: x + jnp.bfloat16(1),
        }
        row = dict(kind="group_quant", m=m, k=k, r=args.r)
        try:
            (q, s), (q_ref, s_ref) = (jax.jit(variants[name])(*xs[0]) for name in ("ours", "xla"))
            row["identical"] = bool(
                (np.asarray(q).view(np.uint8) == np.asarray(q_ref).view(np.uint8)).all()
                and (np.asarray(s) == np.asarray(s_ref)).all()
            )
        except Exception as err:  # recorded; the timing says the rest
            row["identical"] = f"{type(err).__name__}: {str(err)[:300]}"
        row["times"] = timing.compare(
            {name: timing.Variant(fn, xs) for name, fn in variants.items()},
            {},
            calls=args.calls,
            repeats=args.reps,
            cupti=not args.skip_cupti,
        )
        moved = {name: 4 * m * k if name == "copy" else 3 * m * k + 4 * m * (k // BLOCK[1]) for name in variants}
        row["TBps"] = {name: moved[name] / t / 1e12 for name, t in timing.wall_times(row["times"]).items()}
        if row["TBps"].get("ours") and row["TBps"].get("copy"):
            row["ours_over_copy"] = row["TBps"]["ours"] / row["TBps"]["copy"]
        results.append(row)
        print(json.dumps(dict(m=m, k=k, identical=row["identical"], TBps=row["TBps"])), flush=True)
        save()


def entry_kernels(hlo_text: str) -> dict:
    """The work a compiled program launches, from its optimized HLO text: the ENTRY computation's
    instructions counted by opcode (a fusion with its kind, a custom call with its target), leaving
    out parameters, constants, tuples and bitcasts."""
    entry = hlo_text[hlo_text.index("\nENTRY") :].split("\n}", 1)[0]
    counts = collections.Counter()
    for line in entry.splitlines()[1:]:
        if " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1]
        opcode = re.search(r"\s([a-z][a-z0-9-]*)\(", " " + rhs)
        if opcode is None or opcode.group(1) in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        name = opcode.group(1)
        detail = re.search(r'kind=(\w+)|custom_call_target="([^"]+)"', rhs)
        counts[f"{name}:{detail.group(1) or detail.group(2)}" if detail else name] += 1
    return dict(counts)


def print_table(results):
    print("\nblock GEMM, bf16 out, wall clock: TFLOP/s (M <= 64: weight TB/s); ratio = their time / ours")
    print("(ours_block: the default schedule; ours_large_m: the large-M one, where the default is another;")
    print(" ours_wide: the rowwise kernel's wide 128x256 CTA, where the block kernel's narrow one differs;")
    print(" ours_pipelin: the default with the weight-block scales through the pipeline;")
    print(" ours_overlapped: overlapped promotion, on the small-M schedule or the 128x128 CTA; vs torch: our best)")
    cols = [
        "ours_block",
        "ours_large_m",
        "ours_wide",
        "ours_pipelined_scales",
        "ours_overlapped",
        "xla_block",
        "xla_bf16",
        "torch_block",
        "torch_bf16",
    ]
    print(f"{'M':>5} {'K':>6} {'N':>6} | " + " ".join(f"{c[:12]:>12}" for c in cols) + " | vs torch  vs xla  drift")
    for r in results:
        if r["kind"] != "block":
            continue
        d = r["derived"]
        figures = d["weight_tbps"] if r["m"] <= 64 else d["tflops"]
        cells = " ".join(f"{figures[c]:12.1f}" if c in figures else f"{'-':>12}" for c in cols)
        ours_vs_torch = [
            d["ratios"][f"{o}/torch_block"]
            for o in ("ours_block", "ours_large_m", "ours_wide", "ours_pipelined_scales", "ours_overlapped")
            if f"{o}/torch_block" in d["ratios"]
        ]
        vs_torch = max(ours_vs_torch, default=float("nan"))  # the faster of our schedules
        vs_xla = d["ratios"].get("ours_block/xla_block", float("nan"))
        drift = d["max_drift"] if d["max_drift"] is not None else float("nan")
        print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells} | {vs_torch:8.2f} {vs_xla:6.2f} {drift:6.1%}")
    e2e = [r for r in results if r["kind"] == "block_e2e"]
    if e2e:
        print("\nW8A8BlockFp8LinearOp.apply end to end (bf16 in), wall clock TFLOP/s, and over XLA bf16")
        for r in e2e:
            t, ratios = r["derived"]["tflops"], r["derived"]["ratios"]
            cells = " ".join(f"{name} {v:7.1f}" for name, v in t.items())
            over = " ".join(
                f"{name[3:]}/bf16 {ratios.get(f'{name}/xla_bf16', float('nan')):.2f}"
                for name in ("op_kernel", "op_xla_quant", "op_xla")
            )
            print(f"{r['m']:>5} {r['k']:>6} {r['n']:>6} | {cells} | {over}")
    quant = [r for r in results if r["kind"] == "group_quant"]
    if quant:
        print("\ngroup quant, bf16 in, TB/s, wall clock")
        for r in quant:
            cells = " ".join(f"{name} {v:5.2f}" for name, v in r["TBps"].items())
            ratio = r.get("ours_over_copy", float("nan"))
            print(f"{r['m']:>5} x {r['k']:>6}: {cells} | ours/copy {ratio:.2f} identical {r['identical']}")
    checks = [r for r in results if r["kind"] == "block_check"]
    print(f"\nchecks: {sum(bool(r['ok']) for r in checks)}/{len(checks)} passed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes at three M")
    parser.add_argument("--ms", type=int, nargs="+", help="M values (default: the full list)")
    parser.add_argument("--kn", type=int, nargs=2, action="append", help="a (K, N) pair; repeatable")
    parser.add_argument("--reps", type=int, default=timing.REPEATS, help="samples per figure (median, spread)")
    parser.add_argument("--calls", type=int, default=timing.CALLS, help="back-to-back calls per sample")
    parser.add_argument("--r", type=int, default=R, help="distinct operand sets per call")
    parser.add_argument("--e2e", action="store_true", help="also time W8A8BlockFp8LinearOp.apply against XLA bf16")
    parser.add_argument("--e2e-ms", type=int, nargs="+", default=[1024, 4096], help="M values of the end-to-end rows")
    parser.add_argument("--overlapped", action="store_true", help="also check and time overlapped promotion")
    parser.add_argument(
        "--lean", action="store_true", help="time the default schedule, XLA bf16 and torch only (no other schedule)"
    )
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-quant", action="store_true")
    parser.add_argument("--quant-shapes", type=int, nargs=2, action="append", help="an (M, K) of the quant rows")
    parser.add_argument("--skip-cupti", action="store_true")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds of GEMM rows; the rest are skipped")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "block_kernel.json"))
    args = parser.parse_args(argv)
    results = [
        dict(
            kind="run",
            command="python3 benchmarks/block_kernel.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            device=jax.devices()[0].device_kind,
            jax=jax.__version__,
        )
    ]
    print(results[0], flush=True)

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    if not args.skip_checks:
        check_block(results, args.overlapped)
        save()
    ms = args.ms or (QUICK_MS if args.quick else M_VALUES)
    kns = [tuple(kn) for kn in args.kn] if args.kn else (QUICK_KN if args.quick else KN)
    bench_block(results, ms, kns, args, save)
    if not args.skip_quant:
        shapes = [tuple(s) for s in args.quant_shapes] if args.quant_shapes else QUANT_SHAPES
        bench_group_quant(results, shapes, args, save)
    if args.e2e:
        bench_e2e(results, args.e2e_ms, kns, args, save)
    save()
    print_table(results)
    return results


if __name__ == "__main__":
    main()
