"""The demo: a Llama-shaped MLP block (gate, up, down) through every fp8 path this backend runs."""

import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dense, platform, quantization
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import Fp8Scheme

# Llama-3-8B's MLP on an accelerator; a narrower one on CPU so the demo stays under a minute.
SIZES = {"accelerator": (2048, 4096, 14336), "cpu": (128, 1024, 3584)}  # tokens, hidden, intermediate


# The schemes the demo runs, each a name and the `Fp8Scheme` of all three layers.
SCHEMES = [
    ("dynamic per-tensor x per-tensor W", Fp8Scheme("per_tensor", "dynamic_per_tensor", fused=False)),
    ("dynamic per-token x per-channel W", Fp8Scheme("per_channel", "dynamic_per_token", fused=False)),
    ("static x per-channel W", Fp8Scheme("per_channel", "static", fused=False)),
    ("fused: dynamic per-token x per-channel W", Fp8Scheme("per_channel", "dynamic_per_token", fused=True)),
    ("per-token group x 128x128-block W", Fp8Scheme("block", fused=False)),
]


def _mlp_float64(x, gate, up, down):
    def silu(v):
        return v / (1 + np.exp(-v))

    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def run(seed: int = 0) -> Iterator[dict]:
    """Runs each scheme the backend supports; yields one row per scheme (path, error, time) as soon
    as the scheme has compiled and been timed."""
    backend = jax.default_backend()
    tokens, hidden, inter = SIZES["cpu" if backend == "cpu" else "accelerator"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    weights = [
        rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1])
        for shape in [(inter, hidden), (inter, hidden), (hidden, inter)]
    ]
    reference = _mlp_float64(x.astype(np.float64), *(w.astype(np.float64) for w in weights))
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    repeats = 3 if backend == "cpu" else 20

    @jax.jit
    def bf16_block(x, gate, up, down):
        return (jax.nn.silu(x @ gate.T) * (x @ up.T)) @ down.T

    bf16_weights = [jnp.asarray(w, jnp.bfloat16) for w in weights]
    bf16_time = _time(bf16_block, x_bf16, *bf16_weights, repeats=repeats)
    yield {
        "scheme": "bf16 (no quantization)",
        "path": "XLA dot_general",
        "error": _rel_error(bf16_block(x_bf16, *bf16_weights), reference),
        "seconds": bf16_time,
    }
    for name, scheme in SCHEMES:
        if scheme.fused and not platform.fused_fp8_supported():
            continue
        # Static scales from this batch's amax (calibration on the data itself).
        layers = [
            Fp8Params.create(
                *quantization.quantize_weight(
                    w, scheme.weight_granularity, jnp.float8_e4m3fn, block_size=scheme.block_size
                ),
                input_scale=quantization.static_input_scale(np.abs(a).max(), jnp.float8_e4m3fn)
                if scheme.is_static
                else None,
                block_size=scheme.block_size,
            )
            for w, a in zip(weights, _layer_inputs(x, weights))
        ]

        @jax.jit
        def fp8_block(x, layers=layers, scheme=scheme):
            gate, up, down = (functools.partial(dense.fp8_dense, params=p, scheme=scheme) for p in layers)
            return down(jax.nn.silu(gate(x)) * up(x))

        out = fp8_block(x_bf16)
        plan = dense.fp8_linear_op(scheme).plan(x_bf16, layers[0].weight, layers[0].weight_scale, layers[0].input_scale)
        yield {
            "scheme": name,
            "path": plan.gemm,
            "error": _rel_error(out, reference),
            "seconds": _time(fp8_block, x_bf16, repeats=repeats),
        }


def _layer_inputs(x, weights):
    gate, up, down = weights
    h = x @ gate.T
    return [x, x, (h / (1 + np.exp(-h))) * (x @ up.T)]


def _rel_error(out, reference) -> float:
    out = np.asarray(out, np.float64)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def main(seed: int = 0) -> None:
    device = jax.devices()[0]
    tokens, hidden, inter = SIZES["cpu" if device.platform == "cpu" else "accelerator"]
    print(
        f"w8a8_jax demo on {device.platform} ({device.device_kind}); fused fp8 kernel: "
        f"{'yes' if platform.fused_fp8_supported() else 'no'}"
    )
    print(f"Llama-style MLP block: {tokens} tokens, hidden {hidden}, intermediate {inter}, jit-compiled\n")
    header = f"{'scheme':<44} {'GEMM path':<32} {'rel. error vs float64':>22} {'ms / call':>10}"
    print(header)
    print("-" * len(header), flush=True)
    for row in run(seed):  # each scheme compiles first (on a GPU, with cuBLASLt autotuning)
        print(f"{row['scheme']:<44} {row['path']:<32} {row['error']:>22.2e} {row['seconds'] * 1e3:>10.2f}", flush=True)
