"""Our XLA fp8 paths against XLA bf16 and torch._scaled_mm, measured in one process on one GPU.

    python benchmarks/xla_paths.py --out results/     # writes xla_paths.json and xla_paths.md

Launch overhead is kept out of the figures: one timed JAX call runs 4 GEMMs on 4 copies of the
operands, no operand shared between two GEMMs (XLA's dot merger batches GEMMs that share a weight
into one that reads it once) and no weight left in L2; torch replays a CUDA graph of the same
calls. Each figure is the mean
over repeated calls after warm-up, and any figure above the hardware peak is flagged. Also dumps
the compiled HLO of each path and reports its GEMM custom calls.
"""

import argparse
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp

import w8a8_jax

MS = [1, 16, 128, 1024, 4096, 8192]
KNS = [(4096, 6144), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344), (28672, 8192)]
COPIES = 4
PAIRS = [(i, i) for i in range(COPIES)]
FP8_PEAK_TFLOPS = 1979  # H100 SXM dense fp8


def _mean_seconds(call, sync, min_seconds: float) -> float:
    """Mean seconds of `call()` after a warm-up call, repeated for at least `min_seconds`."""
    sync(call())
    reps, start = 0, time.perf_counter()
    while True:
        out = call()
        reps += 1
        if reps >= 3 and time.perf_counter() - start >= min_seconds:
            sync(out)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed / reps


def time_jax(fn, operand_sets, min_seconds: float) -> float:
    """Seconds per GEMM: `fn` on the (activation i, weight i) pairs inside one jitted call."""

    @jax.jit
    def all_pairs(operand_sets):
        return [fn(*operand_sets[i][0], *operand_sets[j][1]) for i, j in PAIRS]

    return _mean_seconds(lambda: all_pairs(operand_sets), jax.block_until_ready, min_seconds) / len(PAIRS)


def time_torch(fn, operand_sets, min_seconds: float) -> float:
    """Seconds per GEMM: a CUDA graph of `fn` on the same pairs, replayed."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i, j in PAIRS:  # warm-up outside the graph (cuBLAS workspace, heuristics)
            fn(*operand_sets[i][0], *operand_sets[j][1])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn(*operand_sets[i][0], *operand_sets[j][1]) for i, j in PAIRS]
    del outputs
    return _mean_seconds(graph.replay, lambda _: torch.cuda.synchronize(), min_seconds) / len(PAIRS)


def jax_variants(m, k, n, key):
    """name -> (fn, operand sets): fn(*activation_part, *weight_part) -> (M, N) bf16."""
    keys = jax.random.split(key, 4)
    xs = [jax.random.normal(jax.random.fold_in(keys[0], i), (m, k), jnp.bfloat16) for i in range(COPIES)]
    ws = [jax.random.normal(jax.random.fold_in(keys[1], i), (n, k), jnp.bfloat16) * 0.02 for i in range(COPIES)]
    qxs = [jnp.clip(x.astype(jnp.float32) * 64, -448, 448).astype(jnp.float8_e4m3fn) for x in xs]
    qws = [jnp.clip(w.astype(jnp.float32) * 2000, -448, 448).astype(jnp.float8_e4m3fn) for w in ws]
    sa_t, sb_t = jnp.array([0.02], jnp.float32), jnp.array([5e-4], jnp.float32)
    sa_r = jax.random.uniform(keys[2], (m, 1), minval=0.01, maxval=0.03)
    sb_r = jax.random.uniform(keys[3], (n, 1), minval=4e-4, maxval=6e-4)
    contract = (((1,), (1,)), ((), ()))
    weight_scales = [jnp.abs(w).max(axis=1, keepdims=True).astype(jnp.float32) / 448 for w in ws]
    op = w8a8_jax.Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=True, pad_output=False)
    bf16 = jnp.bfloat16
    return {
        "xla_bf16": (
            lambda x, w: jax.lax.dot_general(x, w, contract, preferred_element_type=bf16),
            [((xs[i],), (ws[i],)) for i in range(COPIES)],
        ),
        "per_tensor": (
            lambda q, sa, w, sb: w8a8_jax.xla_per_tensor_w8a8_scaled_mm(q, w, sa, sb, None, bf16),
            [((qxs[i], sa_t), (qws[i], sb_t)) for i in range(COPIES)],
        ),
        # The candidate single-rounding per-tensor path: XLA's dequantize-in-float32 pattern, which
        # its GEMM rewriter turns into one cuBLASLt fp8 call with the scales inside and bf16 out
        # (DESIGN §8; a bf16 dequantization is not rewritten).
        "per_tensor_dequant_pattern": (
            lambda q, sa, w, sb: jax.lax.dot_general(
                q.astype(jnp.float32) * sa, w.astype(jnp.float32) * sb, contract, preferred_element_type=jnp.float32
            ).astype(bf16),
            [((qxs[i], sa_t), (qws[i], sb_t)) for i in range(COPIES)],
        ),
        # The alternative per-tensor epilogue: the GEMM rounded to bf16 first, then the scalar scale.
        "per_tensor_bf16_acc": (
            lambda q, sa, w, sb: (jax.lax.dot_general(q, w, contract, preferred_element_type=bf16) * (sa * sb)).astype(
                bf16
            ),
            [((qxs[i], sa_t), (qws[i], sb_t)) for i in range(COPIES)],
        ),
        "per_token": (
            lambda q, sa, w, sb: w8a8_jax.xla_per_token_w8a8_scaled_mm(q, w, sa, sb, None, bf16),
            [((qxs[i], sa_r), (qws[i], sb_r)) for i in range(COPIES)],
        ),
        "channelwise": (
            lambda q, sa, w, sb: w8a8_jax.xla_channelwise_w8a8_scaled_mm(q, w, sa, sb, None, bf16),
            [((qxs[i], sa_r), (qws[i], sb_r)) for i in range(COPIES)],
        ),
        "op_per_token_e2e": (
            lambda x, w, sb: op.apply(x, w, sb),
            [((xs[i],), (qws[i], weight_scales[i])) for i in range(COPIES)],
        ),
    }


def torch_variants(m, k, n):
    """name -> (fn, operand sets), as `jax_variants`."""
    import torch

    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    qxs = [(x.float() * 64).to(torch.float8_e4m3fn) for x in xs]
    qws = [(w.float() * 2000).to(torch.float8_e4m3fn) for w in ws]
    one = torch.tensor(1.0, device="cuda")
    sa_r = torch.rand(m, 1, device="cuda") * 0.02 + 0.01
    sb_r = torch.rand(1, n, device="cuda") * 2e-4 + 4e-4
    bf16 = torch.bfloat16
    return {
        "torch_bf16": (lambda x, w: x @ w.t(), [((xs[i],), (ws[i],)) for i in range(COPIES)]),
        "torch_per_tensor": (
            lambda q, sa, w, sb: torch._scaled_mm(q, w.t(), sa, sb, out_dtype=bf16),
            [((qxs[i], one), (qws[i], one)) for i in range(COPIES)],
        ),
        "torch_rowwise": (
            lambda q, sa, w, sb: torch._scaled_mm(q, w.t(), sa, sb, out_dtype=bf16),
            [((qxs[i], sa_r), (qws[i], sb_r)) for i in range(COPIES)],
        ),
    }


def gemm_custom_calls(fn, args) -> list[str]:
    text = fn.lower(*args).compile().as_text()
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--min-seconds", type=float, default=0.05)
    parser.add_argument("--ms", type=int, nargs="*", default=MS)
    parser.add_argument("--kn", type=int, nargs=2, action="append", help="a (K, N) pair; repeatable; default: all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; torch {torch.__version__}", flush=True)
    hlo = {}
    for name, (fn, operand_sets) in jax_variants(1024, 4096, 6144, jax.random.key(0)).items():
        (activation, weight), _ = operand_sets[0], None
        hlo[name] = gemm_custom_calls(jax.jit(fn), (*activation, *weight))
        print(f"HLO {name}: {hlo[name]}", flush=True)

    rows = []
    for k, n in args.kn or KNS:
        for m in args.ms:
            results = {}
            for name, (fn, operand_sets) in jax_variants(m, k, n, jax.random.key(m * 7 + k + n)).items():
                results[name] = time_jax(fn, operand_sets, args.min_seconds)
            for name, (fn, operand_sets) in torch_variants(m, k, n).items():
                results[name] = time_torch(fn, operand_sets, args.min_seconds)
            jax.clear_caches()
            torch.cuda.empty_cache()
            flops = 2.0 * m * k * n
            for name, seconds in results.items():
                tflops = flops / seconds / 1e12
                weight_bytes = n * k * (2 if "bf16" in name else 1)
                rows.append(
                    {
                        "m": m,
                        "k": k,
                        "n": n,
                        "variant": name,
                        "us": seconds * 1e6,
                        "tflops": tflops,
                        "weight_tbps": weight_bytes / seconds / 1e12,
                        "suspect": tflops > FP8_PEAK_TFLOPS,
                    }
                )
                with open(args.out / "xla_paths.jsonl", "a") as log:  # kept even if the run is cut short
                    log.write(json.dumps(rows[-1]) + "\n")
            print(
                f"M={m:5d} K={k:5d} N={n:5d} | "
                + " ".join(f"{name}={flops / s / 1e12:7.1f}" for name, s in results.items()),
                flush=True,
            )
    (args.out / "xla_paths.json").write_text(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "torch": torch.__version__,
                "hlo_custom_calls": hlo,
                "rows": rows,
            },
            indent=1,
        )
    )
    table = markdown_table(rows)
    (args.out / "xla_paths.md").write_text(table)
    print(table)


def markdown_table(rows) -> str:
    """TFLOP/s per shape and the ratios the project tracks."""
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["m"], row["k"], row["n"]), {})[row["variant"]] = row
    header = (
        "M",
        "K",
        "N",
        "XLA bf16",
        "per-tensor",
        "per-tensor dequant pattern",
        "per-tensor bf16-acc",
        "per-token",
        "channelwise",
        "op e2e",
        "torch per-tensor",
        "torch rowwise",
        "per-tensor / torch",
        "per-token / torch rowwise",
        "op e2e / XLA bf16",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (m, k, n), v in sorted(by_shape.items(), key=lambda item: (item[0][1], item[0][2], item[0][0])):
        t = {name: row["tflops"] for name, row in v.items()}
        lines.append(
            f"| {m} | {k} | {n} | "
            + " | ".join(
                f"{t[name]:.0f}"
                for name in [
                    "xla_bf16",
                    "per_tensor",
                    "per_tensor_dequant_pattern",
                    "per_tensor_bf16_acc",
                    "per_token",
                    "channelwise",
                    "op_per_token_e2e",
                    "torch_per_tensor",
                    "torch_rowwise",
                ]
            )
            + f" | {t['per_tensor'] / t['torch_per_tensor']:.2f} | {t['per_token'] / t['torch_rowwise']:.2f}"
            f" | {t['op_per_token_e2e'] / t['xla_bf16']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
