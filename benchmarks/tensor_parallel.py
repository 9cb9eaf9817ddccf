"""Tensor-parallel fp8 layers over the devices of one host: correctness first, then scaling.

    python benchmarks/tensor_parallel.py --model 8b --out benchmarks/results/tensor_parallel_h100x8_8b.json
    python benchmarks/tensor_parallel.py --tiny --out /tmp/tp.json      # CPU: 8 host devices, tiny sizes

For every tensor-parallel size P in 1, 2, 4, 8 (those <= the device count), two workloads:

- **mlp**: the SwiGLU pair of the example block, gate/up column-parallel (`sharding.column_parallel`),
  down row-parallel (`sharding.row_parallel`), `x + mlp(x)`.
- **block**: the Llama-style decoder block of `examples/llama_block.py` (converted by
  `convert.quantize_nnx`), tensor-parallel as Megatron splits it: fused QKV column-parallel with the
  attention heads (and their KV heads) split across devices, o_proj row-parallel, gate/up
  column-parallel, down row-parallel; norms and residuals replicated.

each in bf16 and in fp8 for each activation scheme (static, dynamic per-tensor, dynamic per-token),
in the same process.

**Correctness phase (runs first, raises on failure).** For every P > 1 and scheme, on layer
inputs captured from the single-device forward: the row-parallel layers' activation codes and
scales equal the single-device quantization bit for bit (the `pmax` of the row amax), and every
layer's output (float32) is within the float32 summation tolerance of the single-device layer.
The whole sharded mlp and block (bf16 activations) are then compared with the single-device ones
within a looser bound (a float32 summation-order difference can flip one bf16 rounding upstream
and so one fp8 code downstream). The single-device functional block is itself checked against the
example's nnx module.

**Timing.** A jitted stack of `--layers` layers, each with its own weights (no GEMM shares an
operand with another, so XLA's dot merger cannot batch them, and with TP shards small enough for
L2 no layer reads weights another left there), chained through the residual; the figure is the
mean seconds per call after a warm-up call, divided by the number of layers. tokens/s = tokens /
per-layer time (the throughput of one layer). Efficiency at P = t(1) / (P * t(P)).

**The collective's share** is measured alone, not by removing it from the layer: the same
collectives the row-parallel layers run (fp8: `psum` of the float32 `(M, hidden)` partial product
plus, for the dynamic schemes, `pmax` of the amax, `(M, 1)` per token or one value per tensor;
bf16: `psum` of the bf16 partial product, as Megatron-style bf16 tensor parallelism all-reduces)
on the same mesh and shapes, a chain of them timed like the layers. Removing the collectives from
the layer would change the program (its output sharding, and the dynamic scales), and nothing in a
row-parallel layer can overlap its `psum` (the next op needs the sum), so the collective alone is
the exposed cost. share = collective time per layer / layer time.
"""

import os

# NVLink multicast (NVLS) stays off on GPUs; must be set before JAX initializes NCCL.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples import llama_block  # noqa: E402
from w8a8_jax import Fp8Params, Fp8Scheme, convert, dense, quantization, sharding  # noqa: E402
from w8a8_jax import nnx as fp8_nnx  # noqa: E402
from w8a8_jax.scheme import WEIGHT_GRANULARITIES  # noqa: E402

AXIS = "tp"
SCHEMES = ("static", "dynamic_per_tensor", "dynamic_per_token")
TP_SIZES = (1, 2, 4, 8)
MODELS = {
    "8b": llama_block.BlockConfig(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, rope_theta=500000.0),
    "70b": llama_block.BlockConfig(hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, rope_theta=500000.0),
    # kv_heads = 8 so that the heads split over 8 devices.
    "tiny": llama_block.BlockConfig(hidden=128, heads=16, kv_heads=8, head_dim=8, ffn=256),
}
# Dense peaks (TFLOP/s per device) to flag impossible figures; devices not listed are not checked.
PEAKS = {"H100": {"bf16": 989, "fp8": 1979}, "H200": {"bf16": 989, "fp8": 1979}}
TENSOR_CORE_FLOOR = 2.0**-11  # fp8 tensor-core accumulation error on Hopper (see NOTES.md)
# Correctness of the whole mlp/block: rms(sharded - single) / rms(single - float32 reference) at most.
# fp8: only rare flipped codes (a float32 summation-order difference at a rounding boundary) may
# differ. bf16: the sharded layer also rounds its P partial products to bf16 before the psum, an
# error of the same size as the bf16 rounding it is compared with.
NOISE_FRACTION = {"fp8": 0.1, "bf16": 2.0}
EPS = 1e-6  # nnx.RMSNorm's default epsilon


class CorrectnessError(AssertionError):
    pass


# --- the block as a function of its parameters, single-device or tensor-parallel -----------------


def rmsnorm(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS) * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def attend(qkv, *, cfg: llama_block.BlockConfig, parts: int):
    """The example's attention core on this device's heads: `qkv (B, T, (h + 2 kv) * D)` -> `(B, T, h * D)`."""
    heads, kv_heads, d = cfg.heads // parts, cfg.kv_heads // parts, cfg.head_dim
    batch, length, _ = qkv.shape
    q = qkv[..., : heads * d].reshape(batch, length, heads, d)
    k = qkv[..., heads * d : (heads + kv_heads) * d].reshape(batch, length, kv_heads, d)
    v = qkv[..., (heads + kv_heads) * d :].reshape(batch, length, kv_heads, d)
    positions = jnp.arange(length)
    q, k = llama_block.rotary(q, positions, cfg.rope_theta), llama_block.rotary(k, positions, cfg.rope_theta)
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(d)
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1).astype(qkv.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, heads * d)


def swiglu(gate_up):
    half = gate_up.shape[-1] // 2
    return jax.nn.silu(gate_up[..., :half]) * gate_up[..., half:]


def as_params(p) -> Fp8Params:
    """One fp8 layer's parameters, given as `Fp8Params` (placed on a mesh) or a dict (a params tree)."""
    return p if isinstance(p, Fp8Params) else Fp8Params.from_dict(p)


@dataclasses.dataclass(frozen=True)
class Ops:
    """How the linear layers and per-shard ops run: `mesh=None` is the single-device program."""

    kind: str  # "bf16" or "fp8" ("float32": the float reference)
    scheme: Fp8Scheme | None = None
    mesh: Mesh | None = None
    out_dtype: object = None

    @property
    def parts(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[AXIS]

    def col(self, x, p):
        if self.kind == "fp8":
            if self.mesh is None:
                return dense.fp8_dense(x, as_params(p), scheme=self.scheme, out_dtype=self.out_dtype)
            return sharding.column_parallel(
                x, p, mesh=self.mesh, axis_name=AXIS, scheme=self.scheme, out_dtype=self.out_dtype
            )
        if self.mesh is None:
            return x @ p["kernel"]
        return jax.shard_map(
            lambda x, w: x @ w, mesh=self.mesh, in_specs=(P(), P(None, AXIS)), out_specs=P(None, None, AXIS)
        )(x, p["kernel"])

    def row(self, x, p):
        if self.kind == "fp8":
            if self.mesh is None:
                return dense.fp8_dense(x, as_params(p), scheme=self.scheme, out_dtype=self.out_dtype)
            return sharding.row_parallel(
                x, p, mesh=self.mesh, axis_name=AXIS, scheme=self.scheme, out_dtype=self.out_dtype
            )
        if self.mesh is None:
            return x @ p["kernel"]
        return jax.shard_map(
            lambda x, w: jax.lax.psum(x @ w, AXIS),
            mesh=self.mesh,
            in_specs=(P(None, None, AXIS), P(AXIS, None)),
            out_specs=P(),
        )(x, p["kernel"])

    def per_shard(self, fn, x):
        if self.mesh is None:
            return fn(x)
        spec = P(None, None, AXIS)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=spec)(x)


def mlp_delta(ops: Ops, p, x, capture=None):
    hidden = ops.per_shard(swiglu, ops.col(x, p["gate_up"]))
    if capture is not None:
        capture.update(gate_up_in=x, down_in=hidden)
    return ops.row(hidden, p["down"]).astype(x.dtype)


def mlp_forward(ops: Ops, p, x, cfg=None):
    return x + mlp_delta(ops, p, x)


def block_forward(ops: Ops, p, x, cfg, capture=None):
    normed = rmsnorm(x, p["input_norm"])
    attn = ops.per_shard(functools.partial(attend, cfg=cfg, parts=ops.parts), ops.col(normed, p["qkv"]))
    if capture is not None:
        capture.update(qkv_in=normed, o_in=attn)
    h = x + ops.row(attn, p["o"]).astype(x.dtype)
    return h + mlp_delta(ops, p, rmsnorm(h, p["post_norm"]), capture)


# --- parameters: from the example's nnx block, laid out for P shards -------------------------------


def fp8_layer_params(layer: fp8_nnx.Fp8Dense) -> dict:
    params = {"weight": layer.weight[...], "weight_scale": layer.weight_scale[...]}
    if layer.input_scale is not None:
        params["input_scale"] = layer.input_scale[...]
    if layer.bias is not None:
        params["bias"] = layer.bias[...]
    return params


def block_params(block: llama_block.DecoderBlock, kind: str) -> dict:
    def linear(layer):
        if kind == "fp8":
            return fp8_layer_params(layer)
        return {"kernel": layer.kernel[...].astype(jnp.bfloat16 if kind == "bf16" else jnp.float32)}

    return {
        "input_norm": block.input_norm.scale[...],
        "post_norm": block.post_attention_norm.scale[...],
        "qkv": linear(block.attn.qkv_proj),
        "o": linear(block.attn.o_proj),
        "gate_up": linear(block.mlp.gate_up_proj),
        "down": linear(block.mlp.down_proj),
    }


def fused_widths(cfg) -> dict:
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"qkv": (q, kv, kv), "gate_up": (cfg.ffn, cfg.ffn)}


def interleave_order(widths, parts: int) -> np.ndarray:
    """Output-channel order that gives shard s the s-th slice of every fused part (Q, K, V / gate, up)."""
    starts = np.cumsum((0,) + tuple(widths))[:-1]
    return np.concatenate(
        [np.arange(s + i * w // parts, s + (i + 1) * w // parts) for i in range(parts) for s, w in zip(starts, widths)]
    )


def layout_for(params: dict, cfg, parts: int) -> dict:
    """Reorders the fused projections' output channels so that a contiguous N split gives each shard
    its own heads (and their KV heads) and its own gate and up columns; codes and scales unchanged."""
    out = dict(params)
    for name, widths in fused_widths(cfg).items():
        order = interleave_order(widths, parts)
        layer = dict(params[name])
        if "kernel" in layer:
            layer["kernel"] = layer["kernel"][:, order]
        else:
            layer["weight"] = layer["weight"][order]
            if layer["weight_scale"].size > 1:
                layer["weight_scale"] = layer["weight_scale"][order]
            if "bias" in layer:
                layer["bias"] = layer["bias"][order]
        out[name] = layer
    return out


def place(params: dict, ops: Ops) -> dict:
    """Puts one layer's parameters on the mesh: column-parallel N split, row-parallel K split."""
    modes = {"qkv": "column", "gate_up": "column", "o": "row", "down": "row"}
    replicated = NamedSharding(ops.mesh, P())
    out = {}
    for name, value in params.items():
        if name not in modes:
            out[name] = jax.device_put(value, replicated)
        elif ops.kind == "fp8":
            out[name] = sharding.shard_params(value, ops.mesh, AXIS, modes[name], scheme=ops.scheme)
        else:
            spec = P(None, AXIS) if modes[name] == "column" else P(AXIS, None)
            out[name] = {"kernel": jax.device_put(value["kernel"], NamedSharding(ops.mesh, spec))}
    return out


def rules_for(cfg, activation_scheme: str, weight_granularity: str) -> list[convert.QuantizationRule]:
    widths = fused_widths(cfg)
    common = dict(weight_granularity=weight_granularity, activation_scheme=activation_scheme)
    return [
        convert.QuantizationRule(r".*qkv_proj", shard_widths=widths["qkv"], **common),
        convert.QuantizationRule(r".*gate_up_proj", shard_widths=widths["gate_up"], **common),
        convert.QuantizationRule(r".*(o_proj|down_proj)", **common),
    ]


def build_blocks(cfg, layers: int, weight_granularity: str, calibration):
    """`layers` float blocks (own weights each) and, per scheme, their fp8 conversions."""
    blocks = [llama_block.DecoderBlock(cfg, rngs=nnx.Rngs(seed)) for seed in range(layers)]
    converted = {}
    for scheme in SCHEMES:
        converted[scheme] = []
        for block in blocks:
            fp8_block = nnx.clone(block)
            convert.quantize_nnx(
                fp8_block,
                rules_for(cfg, scheme, weight_granularity),
                calibration_data=[calibration.astype(jnp.float32)],
            )
            converted[scheme].append(fp8_block)
    return blocks, converted


# --- correctness -------------------------------------------------------------------------------------


def float32_tolerance(k: int) -> float:
    """Relative (to max |ref|) bound for a float32-output fp8 GEMM of K terms summed in another order."""
    bound = 2 * 2.0**-24 + 4 * np.sqrt(k) * 2.0**-24
    return max(bound, TENSOR_CORE_FLOOR) if jax.default_backend() == "gpu" else bound


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape or not np.isfinite(out).all():
        return float("inf")
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def check(checks: list, name: str, error: float, tolerance: float) -> None:
    passed = bool(error <= tolerance)
    checks.append({"check": name, "error": error, "tolerance": tolerance, "passed": passed})
    if not passed:
        raise CorrectnessError(f"{name}: error {error:.3g} exceeds {tolerance:.3g}")


def single_quantize(x2, p, scheme: Fp8Scheme):
    fp8_dtype = p["weight"].dtype
    if scheme.is_static:
        return quantization.scaled_fp8_quant(x2, p["input_scale"], fp8_dtype=fp8_dtype)
    per_token = scheme.activation_scheme == "dynamic_per_token"
    return quantization.scaled_fp8_quant(x2, use_per_token_if_dynamic=per_token, fp8_dtype=fp8_dtype)


def check_row_codes(checks, name, x, p, scheme, mesh):
    """The sharded quantization (pmax of the row amax) gives the single-device codes and scales."""
    x2 = x.reshape(-1, x.shape[-1])
    params = Fp8Params(p["weight"], p["weight_scale"], p.get("input_scale"))
    codes, scales = jax.jit(
        jax.shard_map(
            lambda xs: sharding._row_quantize(xs, params, scheme, AXIS),
            mesh=mesh,
            in_specs=P(None, AXIS),
            out_specs=(P(None, AXIS), P()),
            check_vma=False,
        )
    )(jax.device_put(x2, NamedSharding(mesh, P(None, AXIS))))
    ref_codes, ref_scales = single_quantize(x2, p, scheme)
    differing = int(np.sum(np.asarray(codes).view(np.uint8) != np.asarray(ref_codes).view(np.uint8)))
    differing += int(np.sum(np.asarray(scales).reshape(-1) != np.asarray(ref_scales).reshape(-1)))
    check(checks, f"{name}: codes and scales differing", float(differing), 0.0)


def correctness_phase(cfg, blocks, converted, x, meshes: dict, checks: list) -> None:
    f32 = jnp.float32
    # The functional single-device block is the example's nnx block (float32 activations, where the
    # nnx modules compute in float32).
    x32 = x.astype(f32)
    for scheme in SCHEMES:
        single = Ops("fp8", converted[scheme][0].attn.o_proj.scheme)
        ours = jax.jit(lambda p, x: block_forward(single, p, x, cfg))(block_params(converted[scheme][0], "fp8"), x32)
        module = nnx.jit(lambda block, x: block(x))(converted[scheme][0], x32)
        error = relative_error(ours - x32, module - x32)
        check(checks, f"functional block == example nnx block [{scheme}]", error, float32_tolerance(cfg.ffn))

    layers = (("qkv", "col"), ("o", "row"), ("gate_up", "col"), ("down", "row"))
    workloads = {"mlp": mlp_forward, "block": functools.partial(block_forward, cfg=cfg)}
    float32 = Ops("float32")
    reference = block_params(blocks[0], "float32")
    exact = {
        name: jax.jit(lambda p, x, forward=forward: forward(float32, p=p, x=x))(reference, x32)
        for name, forward in workloads.items()
    }

    def captured(ops, params):
        capture = {}
        block_forward(ops, params, x, cfg, capture)
        return capture

    for kind, scheme in [("bf16", None)] + [("fp8", s) for s in SCHEMES]:
        source = blocks if kind == "bf16" else converted[scheme]
        fp8_scheme = None if kind == "bf16" else converted[scheme][0].attn.o_proj.scheme
        params = block_params(source[0], kind)
        single = Ops(kind, fp8_scheme)
        # The single-device program, once: each layer's input and float32 output, and both workloads.
        inputs = jax.jit(functools.partial(captured, single))(params)
        if kind == "fp8":
            single32 = Ops("fp8", fp8_scheme, None, f32)
            layer_refs = jax.jit(
                lambda p, inputs: {
                    layer: getattr(single32, mode)(inputs[f"{layer}_in"], p[layer]) for layer, mode in layers
                }
            )(params, inputs)
        refs = {
            name: jax.jit(lambda p, x, forward=forward: forward(single, p=p, x=x))(params, x)
            for name, forward in workloads.items()
        }
        for parts, mesh in meshes.items():
            if parts == 1:
                continue
            tag = f"P={parts} {kind}" + ("" if scheme is None else f" {scheme}")
            sharded = Ops(kind, fp8_scheme, mesh)
            placed = place(layout_for(params, cfg, parts), sharded)
            if kind == "fp8":
                # Each layer on the single device's input to it, float32 out.
                sharded32 = Ops("fp8", fp8_scheme, mesh, f32)
                for layer, mode in layers:
                    layer_in = inputs[f"{layer}_in"]
                    if mode == "col":
                        got = jax.jit(sharded32.col)(layer_in, placed[layer])
                        order = interleave_order(fused_widths(cfg)[layer], parts)
                        got = np.asarray(got)[..., np.argsort(order)]
                    else:
                        check_row_codes(
                            checks, f"{tag} {layer} row-parallel", layer_in, params[layer], fp8_scheme, mesh
                        )
                        got = jax.jit(sharded32.row)(layer_in, placed[layer])
                    error = relative_error(got, layer_refs[layer])
                    check(checks, f"{tag} {layer} ({mode}) output", error, float32_tolerance(layer_in.shape[-1]))
            # Whole mlp and block with bf16 activations, as timed. Here a float32 summation-order
            # difference can flip a bf16 rounding and, downstream, an fp8 code by one step, so the
            # bound is relative to the quantization's own noise: rms(sharded - single) must stay a
            # small fraction of rms(single - float32 reference) (bf16: the bf16 noise, psum in bf16).
            for name, forward in workloads.items():
                got = jax.jit(lambda p, x, forward=forward: forward(sharded, p=p, x=x))(placed, x)
                ratio = rms(got, refs[name]) / max(rms(refs[name], exact[name]), 1e-30)
                check(
                    checks, f"{tag} {name}: rms(sharded - single) / rms(single - float32)", ratio, NOISE_FRACTION[kind]
                )


def rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2))) if np.isfinite(a).all() else float("inf")


# --- timing --------------------------------------------------------------------------------------------


def mean_seconds(call, min_seconds: float) -> float:
    """Mean seconds of `call()` after a warm-up call, repeated for at least `min_seconds` (and 3 calls)."""
    jax.block_until_ready(call())
    reps, start = 0, time.perf_counter()
    while True:
        out = call()
        reps += 1
        if reps >= 3 and time.perf_counter() - start >= min_seconds:
            jax.block_until_ready(out)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed / reps


def time_stack(forward, stack, x, min_seconds: float) -> float:
    """Seconds per layer of a jitted chain of the layers in `stack` (each its own weights)."""

    @jax.jit
    def run(stack, x):
        for params in stack:
            x = forward(params, x)
        return x

    return mean_seconds(lambda: run(stack, x), min_seconds) / len(stack)


def time_collectives(mesh, tokens: int, hidden: int, kind: str, scheme: str | None, count: int, min_seconds):
    """Seconds of the collectives of one row-parallel layer, run alone: a chain of `count` of them."""
    parts = mesh.shape[AXIS]
    dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
    partials = [
        jax.device_put(
            jax.random.normal(jax.random.key(i), (parts * tokens, hidden), dtype), NamedSharding(mesh, P(AXIS))
        )
        for i in range(count)
    ]

    def local(*shards):
        acc = jnp.zeros(shards[0].shape, dtype)
        amax = jnp.zeros((tokens, 1), jnp.float32)
        for shard in shards:
            # Each collective depends on the previous one, so none can be combined or overlapped.
            if scheme == "dynamic_per_token":
                amax = jax.lax.pmax(jnp.max(jnp.abs(shard + acc[:, :1]), axis=1, keepdims=True), AXIS)
            elif scheme == "dynamic_per_tensor":
                amax = jax.lax.pmax(jnp.max(jnp.abs(shard + acc[:1, :1])).reshape(1, 1), AXIS) + amax
            acc = jax.lax.psum(shard + amax[:1, :1].astype(dtype), AXIS)
        return acc

    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) * count, out_specs=P(), check_vma=False))
    return mean_seconds(lambda: run(*partials), min_seconds) / count


def layer_flops(cfg, batch: int, seq: int, workload: str) -> float:
    m = batch * seq
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    flops = 2 * m * (cfg.hidden * 2 * cfg.ffn + cfg.ffn * cfg.hidden)
    if workload == "block":
        flops += 2 * m * (cfg.hidden * (q + 2 * kv) + q * cfg.hidden) + 4 * batch * seq * seq * q
    return float(flops)


def peak_tflops(kind: str) -> float | None:
    device_kind = jax.devices()[0].device_kind
    for name, peaks in PEAKS.items():
        if name in device_kind:
            return peaks[kind]
    return None


def benchmark_phase(cfg, blocks, converted, x, meshes, args, weight_granularity) -> list[dict]:
    rows = []
    tokens = args.batch * args.seq
    for parts, mesh in meshes.items():
        for kind, scheme in [("bf16", None)] + [("fp8", s) for s in SCHEMES]:
            source = blocks if kind == "bf16" else converted[scheme]
            fp8_scheme = None if kind == "bf16" else Fp8Scheme(weight_granularity, scheme)
            ops = Ops(kind, fp8_scheme, None if parts == 1 else mesh)
            stack = [layout_for(block_params(b, kind), cfg, parts) for b in source]
            stack = [place(p, Ops(kind, fp8_scheme, mesh)) for p in stack]
            x_placed = jax.device_put(x, NamedSharding(mesh, P()))
            collective = 0.0
            if parts > 1:
                collective = time_collectives(mesh, tokens, cfg.hidden, kind, scheme, args.layers, args.min_seconds)
            for workload, count in (("mlp", 1), ("block", 2)):
                if workload == "mlp":
                    forward = functools.partial(mlp_forward, ops)
                else:
                    forward = functools.partial(block_forward, ops, cfg=cfg)
                seconds = time_stack(forward, stack, x_placed, args.min_seconds)
                flops = layer_flops(cfg, args.batch, args.seq, workload)
                tflops = flops / seconds / 1e12
                peak = peak_tflops(kind)
                rows.append(
                    {
                        "workload": workload,
                        "tp": parts,
                        "dtype": kind,
                        "scheme": scheme,
                        "layer_ms": seconds * 1e3,
                        "tokens_per_s": tokens / seconds,
                        "tflops": tflops,
                        "tflops_per_device": tflops / parts,
                        "above_peak": None if peak is None else bool(tflops / parts > peak),
                        "row_parallel_layers": count,
                        "collective_ms": count * collective * 1e3,
                        "collective_share": count * collective / seconds,
                    }
                )
                print(
                    f"P={parts} {workload:5s} {kind} {scheme or '':18s} {seconds * 1e3:9.3f} ms/layer "
                    f"{tokens / seconds:12.0f} tok/s  collective {count * collective * 1e3:8.3f} ms",
                    flush=True,
                )
    for row in rows:
        base = next(
            r["layer_ms"]
            for r in rows
            if (r["workload"], r["dtype"], r["scheme"], r["tp"]) == (row["workload"], row["dtype"], row["scheme"], 1)
        )
        row["efficiency"] = base / (row["tp"] * row["layer_ms"])
        bf16 = next(
            r["layer_ms"] for r in rows if (r["workload"], r["dtype"], r["tp"]) == (row["workload"], "bf16", row["tp"])
        )
        row["speedup_vs_bf16"] = bf16 / row["layer_ms"]
    return rows


def table(rows: list[dict]) -> str:
    header = "| workload | P | dtype | scheme | ms/layer | tokens/s | collective share | efficiency | vs bf16 |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " (above peak!)" if r["above_peak"] else ""
        lines.append(
            f"| {r['workload']} | {r['tp']} | {r['dtype']} | {r['scheme'] or '-'} | {r['layer_ms']:.3f}{flag} | "
            f"{r['tokens_per_s']:.0f} | {r['collective_share']:.1%} | {r['efficiency']:.2f} | "
            f"{r['speedup_vs_bf16']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results file")
    parser.add_argument("--model", choices=("8b", "70b"), default="8b", help="Llama layer sizes")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU check of the whole script)")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 8)")
    parser.add_argument("--layers", type=int, default=None, help="layers per timed stack; default 4 (tiny: 2)")
    parser.add_argument("--tp", type=int, nargs="*", default=None, help="TP sizes; default 1 2 4 8 that fit")
    parser.add_argument("--weight-granularity", choices=WEIGHT_GRANULARITIES, default="per_channel")
    parser.add_argument("--min-seconds", type=float, default=None, help="per timed figure; default 1.0 (tiny 0)")
    parser.add_argument("--skip-correctness", action="store_true", help="timing only (not for reported runs)")
    args = parser.parse_args(argv)
    args.batch = args.batch or 2
    args.seq = args.seq or (8 if args.tiny else 2048)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.min_seconds = (0.0 if args.tiny else 1.0) if args.min_seconds is None else args.min_seconds
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = MODELS["tiny" if args.tiny else args.model]
    devices = jax.devices()
    sizes = [p for p in (args.tp or TP_SIZES) if p <= len(devices)]
    meshes = {p: Mesh(np.array(devices[:p]), (AXIS,)) for p in sizes}
    print(f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, TP {sizes}")

    key_calibration, key_x = jax.random.split(jax.random.key(1234))
    shape = (args.batch, args.seq, cfg.hidden)
    calibration = jax.random.normal(key_calibration, shape, jnp.bfloat16)
    x = jax.random.normal(key_x, shape, jnp.bfloat16)
    blocks, converted = build_blocks(cfg, args.layers, args.weight_granularity, calibration)

    checks: list[dict] = []
    if not args.skip_correctness:
        correctness_phase(cfg, blocks, converted, x, meshes, checks)
        print(f"correctness: {len(checks)} checks passed")
    rows = benchmark_phase(cfg, blocks, converted, x, meshes, args, args.weight_granularity)

    result = {
        "device": devices[0].device_kind,
        "platform": jax.default_backend(),
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "model": "tiny" if args.tiny else args.model,
        "config": dataclasses.asdict(cfg),
        "batch": args.batch,
        "seq": args.seq,
        "tokens": args.batch * args.seq,
        "layers_per_stack": args.layers,
        "weight_granularity": args.weight_granularity,
        "tp_sizes": sizes,
        "timing": "mean seconds per jitted call after a warm-up call, divided by the layers in the stack",
        "collective_method": (
            "measured alone: a chain of the row-parallel layers' collectives (fp8: float32 psum of "
            "(tokens, hidden) plus the dynamic schemes' pmax of the amax; bf16: bf16 psum) on the same "
            "mesh; share = collective time per layer / layer time"
        ),
        "correctness": {"passed": not args.skip_correctness, "checks": checks},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
