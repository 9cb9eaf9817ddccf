"""The demo: a Llama-shaped MLP block (gate, up, down) through every fp8 path this backend runs."""

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import Fp8LinearOp, platform
from w8a8_jax.quantization import dynamic_per_tensor_scale, quantize_per_tensor

# Llama-3-8B's MLP on an accelerator; a narrower one on CPU so the demo stays under a minute.
SIZES = {"accelerator": (2048, 4096, 14336), "cpu": (128, 1024, 3584)}  # tokens, hidden, intermediate


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One way to run the block: activation scheme, weight granularity, fused kernel allowed."""

    name: str
    static: bool
    per_token: bool
    per_channel: bool
    fused: bool


SCHEMES = [
    Scheme("dynamic per-tensor x per-tensor W", static=False, per_token=False, per_channel=False, fused=False),
    Scheme("dynamic per-token x per-channel W", static=False, per_token=True, per_channel=True, fused=False),
    Scheme("static x per-channel W", static=True, per_token=False, per_channel=True, fused=False),
    Scheme("fused: dynamic per-token x per-channel W", static=False, per_token=True, per_channel=True, fused=True),
]


def _quantize_weight(w: np.ndarray, per_channel: bool):
    """Float `(N, K)` -> fp8 codes and a `(N, 1)` or `(1,)` scale (amax / 448)."""
    w = jnp.asarray(w)
    if per_channel:
        scale = jax.vmap(lambda row: dynamic_per_tensor_scale(row[None], jnp.float8_e4m3fn))(w)[:, None]
        return jax.vmap(lambda row, s: quantize_per_tensor(row[None], s[0], jnp.float8_e4m3fn)[0])(w, scale), scale
    scale = dynamic_per_tensor_scale(w, jnp.float8_e4m3fn)
    return quantize_per_tensor(w, scale, jnp.float8_e4m3fn), scale.reshape(1)


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
    for scheme in SCHEMES:
        if scheme.fused and not platform.fused_fp8_supported():
            continue
        layers = [_quantize_weight(w, scheme.per_channel) for w in weights]
        op = Fp8LinearOp(fused_supported=scheme.fused, use_per_token_if_dynamic=scheme.per_token)
        # Static scales from this batch's amax (calibration on the data itself).
        input_scales = [
            jnp.array([np.abs(a).max() / 448], jnp.float32) if scheme.static else None
            for a in _layer_inputs(x, weights)
        ]

        @jax.jit
        def fp8_block(x, layers=layers, input_scales=input_scales, op=op):
            (gw, gs), (uw, us), (dw, ds) = layers
            h = jax.nn.silu(op.apply(x, gw, gs, input_scale=input_scales[0])) * op.apply(
                x, uw, us, input_scale=input_scales[1]
            )
            return op.apply(h, dw, ds, input_scale=input_scales[2])

        out = fp8_block(x_bf16)
        path = op.gemm_path(*layers[0], input_scale=input_scales[0])
        yield {
            "scheme": scheme.name,
            "path": path.__name__,
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
