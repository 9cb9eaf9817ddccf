"""What XLA's fp8 GEMM accumulates in on GPU, and what float32 accumulation costs it.

Per shape, the GPU time of `dot_general` on fp8 operands (bf16 out) at default precision and with
the algorithms `ANY_F8_ANY_F8_F32` (float32 accumulation, what `w8a8_jax`'s XLA paths ask for on
GPU) and `ANY_F8_ANY_F8_F32_FAST_ACCUM`; at K=14336 also each one's max error against float64,
relative to max |ref|. Timing as in `gpu_kernels.py` (CUPTI, R distinct operand pairs a loop).

  python benchmarks/xla_accumulation.py [--reps N]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))

from gpu_kernels import R, _fp8  # noqa: E402
from timing import time_jax  # noqa: E402

SHAPES = ((4096, 4096, 6144), (4096, 14336, 4096), (8192, 8192, 10240))
ALGORITHMS = {
    "default": None,
    "f32": lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32,
    "fast": lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM,
}
_CONTRACT_K = (((1,), (1,)), ((), ()))


def _dot(precision, out_dtype):
    return lambda ab: lax.dot_general(
        ab[0], ab[1], _CONTRACT_K, precision=precision, preferred_element_type=jnp.float32
    ).astype(out_dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    for m, k, n in SHAPES:
        keys = jax.random.split(jax.random.key(0), 2 * R)
        inputs = [(_fp8(keys[2 * i], (m, k)), _fp8(keys[2 * i + 1], (n, k))) for i in range(R)]
        row = []
        for name, precision in ALGORITHMS.items():
            seconds = time_jax(_dot(precision, jnp.bfloat16), inputs, args.reps)
            row.append(f"{name} {2 * m * k * n / seconds / 1e12:.0f}TF {seconds * 1e6:.1f}us")
        if k == 14336:
            a, b = inputs[0]
            ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
            for name in ("default", "f32"):
                out = np.asarray(jax.jit(_dot(ALGORITHMS[name], jnp.float32))((a, b)), np.float64)
                row.append(f"err_{name} {np.abs(out - ref).max() / np.abs(ref).max():.2e}")
        print(m, k, n, " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
