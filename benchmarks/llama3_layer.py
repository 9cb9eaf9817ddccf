"""One Llama-3-8B decoder layer on one GPU: prefill and decode in bf16 and in fp8.

The layer is `w8a8_jax.models.llama.DecoderLayer` at Llama-3-8B's shapes (hidden 4096,
intermediate 14336, 32 query / 8 key-value heads of 128, RoPE theta 5e5, RMSNorm eps 1e-5):
RMSNorm, q/k/v projections, RoPE, grouped-query attention over a KV cache, o projection, RMSNorm,
gate/up projections, SiLU times up, down projection. Its weights are RANDOM: the layers of
`Llama(config, dtype=bfloat16, rngs=nnx.Rngs(0))` with a 256-token vocabulary (nnx's LeCun-normal
kernels, RMSNorm weights one; the embedding and head are built but never timed), the same draw for
every variant. No kernel branches on data, so the timing does not depend on the values; each
variant records that its output came out finite.

What is timed: L distinct layers (`--layers`, default 8), each with its own weights and KV cache,
applied one after the other inside one jitted function `(weights, x, positions, starts, caches) ->
(h, caches)`; every figure is that call's time divided by L, a figure per layer. No weight is read
twice in a call (none stays in L2 for the next layer) and XLA can merge no two layers' GEMMs. The
caches are donated and threaded from call to call, so a call writes its new rows in place, as a
serving step does, instead of copying every cache to a new buffer; every call gets the same x,
positions and starts (the values never change the work). Wall clock: `timing.wall_samples`,
`--reps` samples of `--calls` back-to-back calls blocked once at the end (dispatch included),
median and spread. CUPTI beside it (`timing.cupti_profile`: the summed kernel time of one call,
median of `--reps`), its top kernels, and all of one call's kernel time sorted into buckets by
kernel name (`kernel_bucket`). Where CUPTI is not there (CPU) those figures are null and the reason
is recorded.

Variants:
  bf16                     the float layers
  channel-token            per-channel weights x dynamic per-token activations (`schemes.quantize`),
                           the quantizer and GEMM the plan picks (on Hopper the Pallas quant kernel)
  channel-token-xla-quant  the same layers traced and compiled under `platform.override` with the
                           fused kernel's `per_token_quant` removed: the XLA formula quantizes, which
                           XLA can fuse with the RMSNorm before it (without a fused kernel on the
                           device, the same program as channel-token)
  tensor-static            per-tensor weights x static activation scales, calibrated through
                           `Llama.__call__` on random token ids

The plan is resolved when a function is traced, so each program is lowered and compiled inside its
variant's context, from a fresh jitted function (no trace cache shared with another variant). Each
records, per fp8 layer, the quantizer and GEMM its op plans for the input that layer gets
(`Fp8LinearOp.plan` on a traced input, in the same context), and the custom calls of the traced and
of the compiled program (on Hopper a Pallas kernel is a `mosaic_gpu_v2` call, a cuBLAS fp8 GEMM
`__cublas$lt$matmul$f8`).

Phases:
  prefill    batch 1, 4096 tokens at positions 0..4095 into a cache of 4096 positions
  decode_bB  B in 1, 16, 64: one token per row at position 2048, caches of 2049 positions (2048 of
             context and the new one): decode with a 2048-token KV cache

Derived per phase: ms per layer; each fp8 variant's speed-up over bf16 (bf16's time over its own,
wall clock and CUPTI); tokens/s through one layer; the XLA quant's speed-up over the kernel's
(channel-token's time over channel-token-xla-quant's); for decode the weight bytes a layer reads
(bf16: 2 bytes a weight; fp8: 1 byte and the float32 scales; the norms' weights included), the
implied TB/s against the H200's 4.8 TB/s, and beside them the KV cache bytes its attention reads.
Goals: fp8 >= 1.5x bf16 at prefill, >= 1.7x at decode batch 1.

The model's attention is the plain XLA formulation: the scores `(B, kv heads, groups, T, S)` are
materialized in float32 (2 GiB a layer at prefill) and softmaxed, and decode reads every cached row
(masked, not sliced). bf16 and fp8 share it, so it bounds the layer's speed-up, at prefill most.
Its einsums run as XLA GEMMs and its mask and softmax as XLA fusions, so by kernel name they land in
the "gemm" and "fusion" buckets; "attention" holds fused attention kernels only. On the H200 (139
GiB) the 8 bf16 layers' weights (3.5 GB), the batch-64 caches (4.3 GB) and the prefill scores fit.

    python3 benchmarks/llama3_layer.py [--out FILE] [--variants NAME ...] [--phases NAME ...]
        [--layers L] [--reps N] [--calls N] [--time-budget S] [--smoke] [--fused]

`--fused`: every variant's q/k/v and gate/up projections fused into one GEMM each
(`models.fused.fuse_projections`: 4 GEMMs a layer instead of 7, one activation quantization for
each fused pair), as vLLM serves them.

`--phases` picks among prefill and decode_bB (default all). `--smoke`: a tiny config (hidden 128,
intermediate 256, 4 heads of 32, 2 key-value heads, 2 layers), prefill 32 tokens, decode at
position 63 (caches of 64) at batches 1 and 2: the whole path on CPU in seconds (the test runs it).
Tasks left when `--time-budget` (default 480 s) runs out are recorded as skipped. Prints a short
table last; every figure and the command line go to `--out` (default `$OUT/llama3_layer.json`, or
`./llama3_layer.json` without `$OUT`), rewritten after every task.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import statistics
import sys
import time
import traceback
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing

from w8a8_jax import dense, dispatch, module_tree, platform
from w8a8_jax.models import fused, schemes
from w8a8_jax.models.llama import DecoderLayer, Llama, LlamaConfig
from w8a8_jax.nnx import Fp8Dense

LLAMA3_8B = LlamaConfig(
    vocab_size=256,  # the real 128256 is never timed; the calibration's token ids only
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=8,  # the distinct layers of one timed call
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)
SMOKE_CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
DTYPE = jnp.bfloat16
HBM_TBPS = 4.8  # H200
GOALS = {"prefill": 1.5, "decode_b1": 1.7}  # fp8 speed-up over bf16, wall clock


@dataclasses.dataclass(frozen=True)
class Variant:
    """A timed variant: `scheme` names a `schemes.SCHEMES` entry (None: bf16); `xla_quant` removes
    the fused kernel's `per_token_quant` while the program is traced."""

    scheme: str | None
    xla_quant: bool = False


VARIANTS = {
    "bf16": Variant(None),
    "channel-token": Variant("channel-token"),
    "channel-token-xla-quant": Variant("channel-token", xla_quant=True),
    "tensor-static": Variant("tensor-static"),
}


@dataclasses.dataclass(frozen=True)
class Phase:
    """One timed shape: `batch` rows of `tokens` new tokens from position `position`, into caches
    of `cache_length` positions."""

    batch: int
    tokens: int
    position: int
    cache_length: int

    @property
    def rows(self) -> int:
        """M of every projection's GEMM."""
        return self.batch * self.tokens


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The run's sizes: the prefill, the decode position and batches, the calibration."""

    prefill_tokens: int
    decode_position: int
    batches: tuple[int, ...]
    calibration_tokens: int
    calibration_length: int

    def phases(self) -> dict[str, Phase]:
        """`{name: Phase}` in run order: prefill from position 0 into a cache it fills, then decode
        of one token per row at `decode_position` with caches of `decode_position + 1` positions."""
        out = {"prefill": Phase(1, self.prefill_tokens, 0, self.prefill_tokens)}
        for batch in self.batches:
            out[f"decode_b{batch}"] = Phase(batch, 1, self.decode_position, self.decode_position + 1)
        return out


FULL = Sizes(4096, 2048, (1, 16, 64), 256, 128)
SMOKE = Sizes(32, 63, (1, 2), 32, 16)


# --- the layers and their programs -----------------------------------------------------------------


def build_layers(config: LlamaConfig, scheme: str | None, sizes: Sizes, fuse: bool = False) -> list[DecoderLayer]:
    """The `config.num_hidden_layers` decoder layers of a bf16 `Llama` with random weights (the same
    draw for every scheme), converted to `scheme` unless None; a static scheme calibrates through
    the whole model on random token ids. With `fuse`, then q/k/v and gate/up are fused
    (`models.fused.fuse_projections`)."""
    model = Llama(config, dtype=DTYPE, rngs=nnx.Rngs(0))
    if scheme is not None:
        calibration = ()
        if schemes.scheme(scheme).is_static:
            ids = np.random.default_rng(1).integers(0, config.vocab_size, sizes.calibration_tokens)
            calibration = schemes.calibration_batches(ids, sizes.calibration_length)
        schemes.quantize(model, scheme, calibration)
    if fuse:
        fused.fuse_projections(model)
    return list(model.layers)


def weight_bytes(layers: list[DecoderLayer]) -> int:
    """Bytes of weights one layer reads (their mean over `layers`): every parameter, fp8 codes and
    float32 scales or bf16 kernels, and the norms' weights."""
    total = sum(leaf.nbytes for layer in layers for leaf in jax.tree.leaves(nnx.state(layer)))
    return int(total // len(layers))


def kv_cache_bytes(config: LlamaConfig, phase: Phase) -> int:
    """Bytes of keys and values one layer's attention reads: every row of its cache."""
    per_row = 2 * config.num_key_value_heads * config.head_dim * jnp.dtype(DTYPE).itemsize
    return phase.batch * phase.cache_length * per_row


def kernel_info(kernel: platform.FusedKernel | None) -> dict:
    """Whether the device has a fused kernel, and the name of its per-token quant kernel (or None)."""
    quant = None if kernel is None else kernel.per_token_quant
    return dict(
        registered=kernel is not None,
        per_token_quant=None if quant is None else getattr(quant, "__name__", repr(quant)),
    )


def variant_context(variant: Variant):
    """The platform context `variant`'s program is traced in: for `xla_quant` the fused kernel
    without its `per_token_quant` (none where the device has no fused kernel), else as it is."""
    if not variant.xla_quant:
        return contextlib.nullcontext()
    kernel = platform.fused_kernel()
    return platform.override(fused_kernel=None if kernel is None else dataclasses.replace(kernel, per_token_quant=None))


def stack_program(graphdefs):
    """A fresh jitted `(states, x (B, T, hidden), positions (B, T) int32, starts (B,) int32, caches)
    -> (h (B, T, hidden), caches)`: the layers (`nnx.split` into `graphdefs` and `states`) one after
    the other, layer i on `caches[i] = (keys, values)`, each `(B, kv heads, S, head_dim)` bf16,
    donated."""

    def run(states, x, positions, starts, caches):
        new_caches = []
        for graphdef, state, (keys, values) in zip(graphdefs, states, caches, strict=True):
            x, keys, values = nnx.merge(graphdef, state)(x, positions, keys, values, starts)
            new_caches.append((keys, values))
        return x, new_caches

    return jax.jit(run, donate_argnames="caches")


def phase_inputs(config: LlamaConfig, phase: Phase, layers: int):
    """`(x, positions, starts, caches)` of `phase`: random bf16 `x`, positions `position ..` on every
    row, zeroed caches (the attention masks by position, so what a row holds does not matter)."""
    x = jax.random.normal(jax.random.key(2), (phase.batch, phase.tokens, config.hidden_size), DTYPE)
    row = jnp.arange(phase.position, phase.position + phase.tokens, dtype=jnp.int32)
    positions = jnp.broadcast_to(row, (phase.batch, phase.tokens))
    starts = jnp.full((phase.batch,), phase.position, jnp.int32)
    shape = (phase.batch, config.num_key_value_heads, phase.cache_length, config.head_dim)
    caches = [(jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE)) for _ in range(layers)]
    return x, positions, starts, caches


class LayerStack:
    """A compiled stack and its inputs: `stack(states)` runs one call on the current caches, keeps
    the caches it returns (the old ones were donated) and returns `h`."""

    def __init__(self, compiled, x, positions, starts, caches):
        self.compiled = compiled
        self.x, self.positions, self.starts, self.caches = x, positions, starts, caches

    def __call__(self, states):
        h, self.caches = self.compiled(states, self.x, self.positions, self.starts, self.caches)
        return h


def traced_plan(layer: Fp8Dense, rows: int) -> dispatch.Plan:
    """The plan `layer`'s op makes for a traced `(rows, K)` bf16 input, as inside the stack's trace
    (where rows are not padded to a bucket), under the platform context of the call."""
    op, params = dense.fp8_linear_op(layer.scheme), layer.params
    input_scale = params.input_scale if layer.scheme.is_static else None
    plans = []

    def probe(x):
        plans.append(op.plan(x, params.weight, params.weight_scale, input_scale, out_dtype=layer.dtype))
        return x

    jax.eval_shape(probe, jax.ShapeDtypeStruct((rows, layer.in_features), DTYPE))
    return plans[0]


def layer_plans(layers: list[DecoderLayer], rows: int) -> list[dict]:
    """Every fp8 projection's plan for `rows` input rows: path, (M, K, N), quantizer, GEMM, reason."""
    out = []
    for i, layer in enumerate(layers):
        for path, _, linear in module_tree.find_layers(layer, (Fp8Dense,)):
            plan = traced_plan(linear, rows)
            out.append(dict(path=f"layers/{i}/{path}", m=rows, k=linear.in_features, n=linear.out_features,
                            quantizer=plan.quantizer, gemm=plan.gemm, reason=plan.reason))  # fmt: skip
    return out


def custom_calls(text: str) -> dict[str, int]:
    """Custom-call targets and their counts in a program's text: StableHLO (`lowered.as_text()`) or
    compiled HLO (`compiled.as_text()`)."""
    targets = re.findall(r'custom_call_target="([^"]+)"|stablehlo\.custom_call @([\w$.]+)', text)
    return dict(Counter(hlo or stablehlo for hlo, stablehlo in targets))


def output_summary(h) -> dict:
    values = np.asarray(h, np.float32)
    return dict(output_finite=bool(np.isfinite(values).all()), output_std=float(values.std()))


# --- CUPTI buckets ---------------------------------------------------------------------------------

# Markers in lower-case kernel names, tried in this order; a name matching none is "fusion".
BUCKET_MARKERS = (
    ("attention", ("fmha", "flash", "attention")),  # fused attention kernels (cuDNN, flash)
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90", "cublas", "matmul")),  # cuBLAS(Lt), XLA's gemm_fusion_dot
    ("quant", ("quant",)),  # the Pallas per-token quant kernel (`_quant_kernel`, a Mosaic GPU kernel)
)


def kernel_bucket(name: str) -> str:
    """The bucket of a CUPTI kernel name: "attention" (a fused attention kernel), "gemm" (cuBLAS's
    nvjet/sm90/cutlass kernels, XLA's Triton `gemm_fusion_dot_*`, the Pallas fp8 GEMM), "quant" (the
    Pallas per-token quant kernel), else "fusion" (XLA's loop and reduction fusions: norms, RoPE,
    masks and softmax, scales, the XLA quant formula, cache writes, copies)."""
    lower = name.lower()
    for bucket, markers in BUCKET_MARKERS:
        if any(marker in lower for marker in markers):
            return bucket
    return "fusion"


def bucket_seconds(timings: list[tuple[str, float]], per: int) -> dict:
    """CUPTI's `(kernel name, ms)` of one call as `{bucket: {"seconds", "share"}}`, seconds per `per`."""
    seconds = Counter()
    for name, ms in timings:
        seconds[kernel_bucket(name)] += ms / 1e3 / per
    total = sum(seconds.values())
    return {bucket: dict(seconds=seconds[bucket], share=seconds[bucket] / total if total else None)
            for bucket in ("gemm", "quant", "attention", "fusion")}  # fmt: skip


def cupti_figures(fn, reps: int, state: dict, per: int) -> dict | None:
    """`timing.cupti_profile` of `fn()` per `per` (seconds, samples, top kernels) and the buckets of
    one more call's kernels; None where CUPTI is not there or failed (recorded in `state`)."""
    profile = timing.cupti_profile(fn, reps, state, per=per, kernels=True)
    if profile is None:
        return None
    try:
        profile["buckets"] = bucket_seconds(timing._kernel_times(fn), per)
    except Exception as err:  # the profile stands without its buckets
        state.setdefault("failures", []).append(f"buckets: {type(err).__name__}: {str(err)[:300]}")
    return profile


# --- one task: a variant at a phase ----------------------------------------------------------------


def run_task(ctx: dict, phase_name: str, variant_name: str) -> dict:
    """Compiles `variant_name`'s stack for `phase_name` in the variant's context, then times it."""
    config, phase, reps = ctx["config"], ctx["phases"][phase_name], ctx["reps"]
    variant = VARIANTS[variant_name]
    layers = ctx["layers"][variant.scheme]
    graphdefs, states = zip(*(nnx.split(layer) for layer in layers))
    states = list(states)
    x, positions, starts, caches = phase_inputs(config, phase, len(layers))
    with variant_context(variant):
        start = time.perf_counter()
        lowered = stack_program(graphdefs).lower(states, x, positions, starts, caches)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        plans = layer_plans(layers, phase.rows)
    stack = LayerStack(compiled, x, positions, starts, caches)
    out = output_summary(stack(states))
    samples = timing.wall_samples(stack, states, reps, ctx["calls"])
    cupti = cupti_figures(lambda: stack(states), reps, ctx["cupti"], per=len(layers))
    wall_s = statistics.median(samples)
    cupti_s = None if cupti is None else cupti["seconds"]
    memory = compiled.memory_analysis()
    result = dict(
        compile_s=compile_s,
        temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        wall_s=wall_s,
        wall=timing.summary(samples),
        wall_samples_s=samples,
        ms_per_layer=1e3 * wall_s,
        tokens_per_s=phase.rows / wall_s,
        cupti_s=cupti_s,
        cupti_ms_per_layer=None if cupti_s is None else 1e3 * cupti_s,
        cupti_tokens_per_s=None if cupti_s is None else phase.rows / cupti_s,
        cupti=cupti,
        **out,
        plans=plans,
        plan_counts=dict(Counter(f"{p['quantizer']} + {p['gemm']}" for p in plans)),
        traced_custom_calls=custom_calls(lowered.as_text()),
        compiled_custom_calls=custom_calls(compiled.as_text()),
        weight_bytes=ctx["weight_bytes"][variant.scheme],
    )
    if phase.tokens == 1:
        weights, cache = result["weight_bytes"], kv_cache_bytes(config, phase)
        result.update(
            kv_cache_bytes=cache,
            **bandwidth(weights, cache, wall_s, ""),
            **bandwidth(weights, cache, cupti_s, "cupti_"),
        )
    return result


def bandwidth(weights: int, cache: int, seconds: float | None, prefix: str) -> dict:
    """The TB/s that reading `weights` (and `weights + cache`) bytes in `seconds` implies, and the
    weights' fraction of the H200's HBM bandwidth; None without a time."""
    if seconds is None:
        return {f"{prefix}weight_tbps": None, f"{prefix}weight_frac_hbm": None, f"{prefix}weight_and_cache_tbps": None}
    tbps = weights / seconds / 1e12
    return {f"{prefix}weight_tbps": tbps, f"{prefix}weight_frac_hbm": tbps / HBM_TBPS,
            f"{prefix}weight_and_cache_tbps": (weights + cache) / seconds / 1e12}  # fmt: skip


# --- derived figures -------------------------------------------------------------------------------


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def derive(row: dict, goal: float | None) -> dict:
    """A phase's comparisons from `row` = `{variant: {"wall_s": s, "cupti_s": s or None}}` (seconds
    per layer): `speedup[variant]` = bf16's time / the variant's, `{"wall", "cupti"}` (above 1: fp8
    faster; None where a time is missing); `xla_quant_over_kernel_quant` = channel-token's time /
    channel-token-xla-quant's (above 1: the XLA formula is faster); with a `goal` (a speed-up),
    `meets_goal[variant]` by wall clock."""
    base = row.get("bf16")
    speedup = {}
    if base is not None:
        for variant, times in row.items():
            if variant != "bf16":
                speedup[variant] = {k: _ratio(base[f"{k}_s"], times[f"{k}_s"]) for k in ("wall", "cupti")}
    out = dict(speedup=speedup)
    kernel, xla = row.get("channel-token"), row.get("channel-token-xla-quant")
    if kernel is not None and xla is not None:
        out["xla_quant_over_kernel_quant"] = {k: _ratio(kernel[f"{k}_s"], xla[f"{k}_s"]) for k in ("wall", "cupti")}
    if goal is not None:
        out["goal"] = goal
        out["meets_goal"] = {v: s["wall"] >= goal for v, s in speedup.items() if s["wall"] is not None}
    return out


def derive_phase(entry: dict, phase_name: str) -> dict:
    """`derive` of a phase entry of the results (its variants that ran)."""
    row = {v: dict(wall_s=r["wall_s"], cupti_s=r["cupti_s"]) for v, r in entry["variants"].items()}
    return derive(row, GOALS.get(phase_name))


# --- summary ---------------------------------------------------------------------------------------


# (label, figure, format): a figure is a key of a variant's result, or ("speedup", "wall" | "cupti").
TABLE_ROWS = (
    ("ms (wall)", "ms_per_layer", ".4g"),
    ("ms (CUPTI)", "cupti_ms_per_layer", ".4g"),
    ("speed-up (wall)", ("speedup", "wall"), ".2f"),
    ("speed-up (CUPTI)", ("speedup", "cupti"), ".2f"),
    ("tokens/s", "tokens_per_s", ".4g"),
)
DECODE_ROWS = (("weight TB/s (wall)", "weight_tbps", ".3g"), ("weight TB/s (CUPTI)", "cupti_weight_tbps", ".3g"))


def _format(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cell(entry: dict, variant: str, figure, fmt: str) -> str:
    if isinstance(figure, tuple):
        return _format(entry["derived"]["speedup"].get(variant, {}).get(figure[1]), fmt)
    return _format(entry["variants"].get(variant, {}).get(figure), fmt)


def print_table(results: dict) -> None:
    """Per phase and variant: ms per layer, speed-up over bf16, tokens/s, for decode TB/s; the goals."""
    variants = results["config"]["variants"]
    layers = results["config"]["layers"]
    print(f"\n{results['device']}, jax {results['jax']}; figures per layer, {layers} distinct layers a call")
    print("".ljust(32) + "".join(v.rjust(25) for v in variants))
    for name, entry in results["phases"].items():
        for label, figure, fmt in TABLE_ROWS + (DECODE_ROWS if name != "prefill" else ()):
            print(f"{name:12s}{label:20s}" + "".join(_cell(entry, v, figure, fmt).rjust(25) for v in variants))
        derived = entry["derived"]
        if "xla_quant_over_kernel_quant" in derived:
            wall, cupti = (_format(derived["xla_quant_over_kernel_quant"][k], ".3f") for k in ("wall", "cupti"))
            print(f"{name:12s}channel-token / channel-token-xla-quant time: {wall} (wall), {cupti} (CUPTI)")
        if "goal" in derived:
            met = ", ".join(f"{v} {'yes' if ok else 'no'}" for v, ok in derived["meets_goal"].items())
            print(f"{name:12s}goal fp8 >= {derived['goal']}x bf16 (wall): {met or '-'}")
    for key, what in (("skipped", "skipped (time budget)"), ("errors", "errors")):
        if results[key]:
            print(f"{what}: " + ", ".join(f"{e['variant']}/{e['phase']}" for e in results[key]))


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "llama3_layer.json"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--phases", nargs="+", help="prefill and decode_bB (B: 1 16 64; --smoke: 1 2); default all")
    parser.add_argument("--layers", type=int, help="distinct layers a call (default 8; --smoke 2)")
    parser.add_argument("--reps", type=int, default=timing.REPEATS, help="wall-clock samples and CUPTI measurements")
    parser.add_argument("--calls", type=int, default=timing.CALLS, help="back-to-back calls a wall-clock sample")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; tasks left after it are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny config and sizes: the whole path in seconds on CPU")
    parser.add_argument(
        "--fused", action="store_true", help="fuse q/k/v and gate/up into one projection each, in every variant"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    config, sizes = (SMOKE_CONFIG, SMOKE) if args.smoke else (LLAMA3_8B, FULL)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    phases = sizes.phases()
    chosen = args.phases or list(phases)
    unknown = [name for name in chosen if name not in phases]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}: choose among {list(phases)}")
    device = jax.devices()[0]
    results = dict(
        benchmark="llama3_layer",
        command=shlex.join(["python3", sys.argv[0] if sys.argv[0] else "benchmarks/llama3_layer.py", *argv]),
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        config=dict(
            model=dataclasses.asdict(config),
            model_name="smoke (random weights)" if args.smoke else "Llama-3-8B layer (random weights)",
            smoke=args.smoke,
            dtype="bfloat16",
            layers=config.num_hidden_layers,
            sizes=dataclasses.asdict(sizes),
            phases={name: dataclasses.asdict(phases[name]) for name in chosen},
            variants=list(args.variants),
            fused_projections=args.fused,
            reps=args.reps,
            calls=args.calls,
            time_budget_s=args.time_budget,
            hbm_tbps=HBM_TBPS,
            goals=GOALS,
        ),
        fused_kernel=kernel_info(platform.fused_kernel()),
        models={},
        phases={name: dict(variants={}, derived={}) for name in chosen},
        skipped=[],
        errors=[],
    )
    ctx = dict(config=config, phases=phases, reps=args.reps, calls=args.calls, cupti={"error": None},
               layers={}, weight_bytes={})  # fmt: skip
    deadline = start + args.time_budget
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}: {results['config']['model_name']}")

    def save():
        for name, entry in results["phases"].items():
            entry["derived"] = derive_phase(entry, name)
        results["cupti"] = ctx["cupti"]["error"]
        results["cupti_failures"] = ctx["cupti"].get("failures", [])
        results["elapsed_s"] = time.perf_counter() - start
        results["process_peak_bytes_in_use"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    for phase_name in chosen:
        for variant_name in args.variants:
            scheme = VARIANTS[variant_name].scheme
            if time.perf_counter() > deadline:
                results["skipped"].append(dict(variant=variant_name, phase=phase_name, reason="time budget"))
                continue
            if any(e["phase"] == "build" and e["scheme"] == scheme for e in results["errors"]):
                continue  # layers that could not be built are not tried again
            t0, step = time.perf_counter(), "build"
            try:
                if scheme not in ctx["layers"]:
                    layers = build_layers(config, scheme, sizes, fuse=args.fused)
                    ctx["layers"][scheme], ctx["weight_bytes"][scheme] = layers, weight_bytes(layers)
                    results["models"][scheme or "bf16"] = dict(
                        build_s=time.perf_counter() - t0, weight_bytes_per_layer=ctx["weight_bytes"][scheme]
                    )
                step = phase_name
                results["phases"][phase_name]["variants"][variant_name] = run_task(ctx, phase_name, variant_name)
                print(f"  {phase_name:10s} {variant_name:24s} {time.perf_counter() - t0:7.1f} s", flush=True)
            except Exception as err:
                error = f"{type(err).__name__}: {str(err)[:500]}"
                results["errors"].append(dict(variant=variant_name, scheme=scheme, phase=step, error=error,
                                              traceback=traceback.format_exc()[-3000:]))  # fmt: skip
                print(f"  {phase_name:10s} {variant_name:24s} FAILED: {error[:200]}", flush=True)
            save()
    save()
    print_table(results)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
