"""Block-scaled fp8 on one GPU: the float32-output accuracy of the XLA block formulations, and where
the dequantized one starts to win (the plan's `BLOCK_DEQUANT_MIN_OUTPUTS`).

Accuracy: `xla_block_w8a8_scaled_mm` (per-k-block fp8 GEMMs), the dequantized formulation by
`BF16_BF16_F32_X3` (what `xla_block_dequant_w8a8_scaled_mm` runs) and by `BF16_BF16_F32_X6`, float32
out, against float64 NumPy (codes times scales, matmul): max and rms error relative to max / rms
|ref|, at 1024x7168x2112 and 256x18432x7168. Crossover: the per-k-block and the X3 formulations,
bf16 out, wall clock per call over 3 distinct operand sets in one jitted program (median of 5), at
M in {256, 512, 1024} on three DeepSeek-V3 shapes (the M = 128 and 4096 figures are
`block_fp8.py`'s).

    python benchmarks/block_accuracy.py      # writes $OUT/block_accuracy.json (or ./)
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import w8a8_jax
from w8a8_jax import block_scaled_mm, layout, quantization

BLOCK = (128, 128)


def operands(m, k, n, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, k), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (n, k), jnp.float32) * 0.05
    weight, scale_b = quantization.quantize_weight(w, "block", jnp.float8_e4m3fn, block_size=BLOCK)
    qinput, scale_a = w8a8_jax.per_token_group_quant_fp8(x, 128)
    return qinput, weight, scale_a, scale_b


def dequantized(algorithm):
    def fn(qinput, weight, scale_a, scale_b, out_dtype=jnp.float32):
        a = quantization.dequantize_weight(qinput, scale_a, (1, BLOCK[1]))
        w = quantization.dequantize_weight(weight, scale_b, BLOCK)
        acc = jax.lax.dot_general(a, w, layout.CONTRACT_K, precision=algorithm, preferred_element_type=jnp.float32)
        return acc.astype(out_dtype)

    return fn


def per_k_block(qinput, weight, scale_a, scale_b, out_dtype=jnp.float32):
    return block_scaled_mm.xla_block_w8a8_scaled_mm(qinput, weight, scale_a, scale_b, BLOCK, None, out_dtype)


FORMULATIONS = {
    "per_k_block_fp8": per_k_block,
    "dequant_x3": dequantized(jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3),
    "dequant_x6": dequantized(jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6),
}


def float64_reference(qinput, weight, scale_a, scale_b):
    k, n = qinput.shape[1], weight.shape[0]
    a = np.asarray(qinput.astype(jnp.float32), np.float64) * np.repeat(np.asarray(scale_a, np.float64), 128, 1)[:, :k]
    scale_w = np.repeat(np.repeat(np.asarray(scale_b, np.float64), 128, 0)[:n], 128, 1)[:, :k]
    return a @ (np.asarray(weight.astype(jnp.float32), np.float64) * scale_w).T


def main():
    rows = []
    for m, k, n in [(1024, 7168, 2112), (256, 18432, 7168)]:
        ops = operands(m, k, n)
        ref = float64_reference(*ops)
        for name, fn in FORMULATIONS.items():
            err = np.abs(np.asarray(jax.jit(fn)(*ops), np.float64) - ref)
            row = dict(kind="accuracy", m=m, k=k, n=n, path=name, max_rel=float(err.max() / np.abs(ref).max()))
            row["rms_rel"] = float(np.sqrt((err**2).mean() / (ref**2).mean()))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for k, n in [(7168, 24576), (16384, 7168), (7168, 2112)]:
        for m in (256, 512, 1024):
            sets = [operands(m, k, n, seed) for seed in range(3)]
            for name in ("per_k_block_fp8", "dequant_x3"):
                fn = FORMULATIONS[name]
                looped = jax.jit(lambda sets, fn=fn: [fn(*ops, out_dtype=jnp.bfloat16) for ops in sets])
                compiled = looped.lower(sets).compile()
                jax.block_until_ready(looped(sets))
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    jax.block_until_ready(looped(sets))
                    times.append((time.perf_counter() - start) / len(sets))
                row = dict(kind="time", m=m, k=k, n=n, path=name, ms=1e3 * float(np.median(times)))
                row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20 / len(sets)
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "block_accuracy.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
