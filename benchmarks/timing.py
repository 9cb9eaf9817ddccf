"""The timing harness of every GPU benchmark.

JAX: a jitted loop over R distinct operand sets returns all R outputs (so XLA can neither merge
nor drop calls, and no weight stays in L2 from one call to the next). Its figure is the wall clock
of `calls` back-to-back calls of that program, blocked once at the end, divided by `calls * R`:
what a jitted step sees, dispatch gaps included. CUPTI (`jax.experimental.mosaic.gpu.profiler`:
the GPU time of the kernels launched, without dispatch or gaps) is reported beside it, never
instead of it. torch: the same R operand sets (shared through DLPack, no copy: fp8 travels as a
uint8 view and is reinterpreted on the torch side), `calls` passes of R calls back to back, one
synchronize at the end. `compare` times a row's JAX variants, then its torch variants, then the
JAX variants again, so that drift between the two JAX passes shows; every side reports the median
and spread of its repeats.
"""

import dataclasses
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

# Back-to-back calls in one wall-clock sample, and samples per figure.
CALLS = 10
REPEATS = 3


def looped(fn):
    """`fn` applied to each of R operand sets inside one jitted program, returning all R outputs."""
    return jax.jit(lambda xs: [fn(x) for x in xs])


def compile_looped(fn, inputs):
    """`(compiled, seconds)`: `looped(fn)` lowered and compiled for `inputs` (a list of R operand
    sets), and the time that took. The compiled program also reports its `memory_analysis()`."""
    start = time.perf_counter()
    compiled = looped(fn).lower(inputs).compile()
    return compiled, time.perf_counter() - start


def kernel_seconds(call, inputs, reps):
    """Median CUPTI kernel seconds per operand set of `call(inputs)` (a jitted or compiled loop over
    the R sets), over `reps` calls after one warm-up. Raises RuntimeError where CUPTI is not there
    (no CUDA) or the call launched no kernel."""
    _, times_ms = profiler.measure(call, iterations=reps)(inputs)
    if times_ms is None:
        raise RuntimeError("no kernel was launched")
    if not isinstance(times_ms, list):  # a single iteration reports one figure
        times_ms = [times_ms]
    return statistics.median(times_ms) / 1e3 / len(inputs)


def wall_samples(call, inputs, reps, calls=CALLS):
    """`reps` wall-clock samples, seconds per operand set, of `call(inputs)` (a warmed-up jitted or
    compiled loop over the R sets): each sample is `calls` calls back to back, the last one blocked
    (the device runs them in order, so that waits for all)."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            out = call(inputs)
        jax.block_until_ready(out)
        del out
        samples.append((time.perf_counter() - start) / (calls * len(inputs)))
    return samples


def wall_seconds(call, inputs, reps, calls=CALLS):
    """Median of `wall_samples`."""
    return statistics.median(wall_samples(call, inputs, reps, calls))


def time_jax(fn, inputs, reps):
    """Median seconds per call of fn over the R distinct inputs: the GPU time of the kernels the
    jitted loop launches, summed (CUPTI), so JAX's per-call dispatch is not counted."""
    loop = looped(fn)
    jax.block_until_ready(loop(inputs))
    return kernel_seconds(loop, inputs, reps)


def time_jax_wall(fn, inputs, reps):
    """Median wall-clock seconds per call of fn over the R distinct inputs, one jitted loop a
    sample (its dispatch counted), beside `time_jax`'s kernel time."""
    loop = looped(fn)
    jax.block_until_ready(loop(inputs))
    return wall_seconds(loop, inputs, reps)


def time_torch(fn, inputs, reps):
    """Median seconds per call of fn over the R inputs, by CUDA events around each loop."""
    import torch

    for x in inputs:
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in inputs:
            fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return statistics.median(times)


def torch_sync(device):
    """Waits for torch's work on `device` (a no-op off CUDA)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def torch_wall_samples(fn, inputs, reps, device="cuda", calls=CALLS):
    """`reps` wall-clock samples, seconds per call, of fn over the R inputs: one warm-up pass, then
    each sample is `calls` passes of the R calls back to back and one synchronize."""
    for x in inputs:
        fn(x)
    torch_sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            for x in inputs:
                fn(x)
        torch_sync(device)
        samples.append((time.perf_counter() - start) / (calls * len(inputs)))
    return samples


def time_torch_wall(fn, inputs, reps, device="cuda", calls=CALLS):
    """Median of `torch_wall_samples`."""
    return statistics.median(torch_wall_samples(fn, inputs, reps, device, calls))


def to_torch(x):
    """A torch tensor sharing `x`'s data through DLPack: fp8 arrays travel as a uint8 view
    (`bitcast_convert_type`, the same bytes) and come back as torch's fp8 dtype by `.view`. Waits
    for `x` first, so torch never reads a buffer JAX is still writing."""
    import torch

    fp8 = {jnp.dtype(jnp.float8_e4m3fn): torch.float8_e4m3fn, jnp.dtype(jnp.float8_e5m2): torch.float8_e5m2}
    if x.dtype in fp8:
        raw = jax.block_until_ready(jax.lax.bitcast_convert_type(x, jnp.uint8))
        return torch.from_dlpack(raw).view(fp8[x.dtype])
    return torch.from_dlpack(jax.block_until_ready(x))


def summary(samples) -> dict:
    """Median, min, max and spread ((max - min) / median) of timing samples."""
    median = statistics.median(samples)
    return dict(median=median, min=min(samples), max=max(samples), spread=(max(samples) - min(samples)) / median)


# Rows at or below this M also report the weight's bytes/s: a decode GEMM reads its weight once.
DECODE_M = 64


def wall_times(entries: dict) -> dict:
    """`{name: wall_s}` of `compare`'s entries that were timed (failures left out)."""
    return {name: t["wall_s"] for name, t in entries.items() if t.get("wall_s")}


def gemm_figures(entries: dict, m: int, k: int, n: int) -> dict:
    """An `(M, K) x (K, N)` GEMM row's figures from `compare`'s entries: TFLOP/s by wall clock and
    (JAX) by CUPTI, weight TB/s at M <= DECODE_M (2 bytes a weight for a `*bf16` variant, else 1),
    and the largest drift between a JAX variant's two passes."""
    flops = 2.0 * m * k * n
    wall = wall_times(entries)
    out = dict(
        tflops={name: flops / t / 1e12 for name, t in wall.items()},
        cupti_tflops={name: flops / t["cupti_s"] / 1e12 for name, t in entries.items() if t.get("cupti_s")},
    )
    if m <= DECODE_M:
        out["weight_tbps"] = {name: n * k * (2 if name.endswith("bf16") else 1) / t / 1e12 for name, t in wall.items()}
    out["max_drift"] = max((abs(t["drift"]) for t in entries.values() if "drift" in t), default=None)
    return out


def _failure(err: Exception) -> dict:
    return dict(error=f"{type(err).__name__}: {str(err)[:300]}")


@dataclasses.dataclass
class Variant:
    """One timed path: `fn` of one operand set, and its R operand sets (distinct arrays)."""

    fn: object
    inputs: list


def compare(jax_variants: dict, torch_variants: dict, *, calls=CALLS, repeats=REPEATS, cupti=True, device="cuda"):
    """Times one row's paths in one process: the JAX variants, then the torch variants, then the JAX
    variants again. Returns `{name: entry}`, every time in seconds per operand set:

      JAX    `wall_s` (median of both passes' samples), `first`/`second` (each pass's `summary`),
             `drift` (second / first - 1), `cupti_s` (median CUPTI kernel time, or None with a
             `cupti_error`), `compile_s`
      torch  `wall_s` and `wall` (its `summary`)

    A variant that raises gets `{"error": ...}` and is left out of the later passes.
    """
    entries, compiled = {}, {}
    for name, v in jax_variants.items():
        try:
            compiled[name], compile_s = compile_looped(lambda xs, fn=v.fn: fn(*xs), v.inputs)
            jax.block_until_ready(compiled[name](v.inputs))
            entries[name] = dict(compile_s=compile_s, first=wall_samples(compiled[name], v.inputs, repeats, calls))
        except Exception as err:  # a failing variant is reported, not fatal
            entries[name] = _failure(err)
            compiled.pop(name, None)
    for name, v in torch_variants.items():
        try:
            samples = torch_wall_samples(lambda xs, fn=v.fn: fn(*xs), v.inputs, repeats, device, calls)
            entries[name] = dict(wall_s=statistics.median(samples), wall=summary(samples))
        except Exception as err:
            entries[name] = _failure(err)
    for name, call in compiled.items():
        inputs = jax_variants[name].inputs
        entry = entries[name]
        second = wall_samples(call, inputs, repeats, calls)
        first = entry["first"]
        entry.update(
            wall_s=statistics.median(first + second),
            first=summary(first),
            second=summary(second),
            drift=statistics.median(second) / statistics.median(first) - 1,
            cupti_s=None,
        )
        if cupti:
            try:
                entry["cupti_s"] = kernel_seconds(call, inputs, repeats)
            except Exception as err:  # the wall-clock figure stands without it
                entry["cupti_error"] = _failure(err)["error"]
    return entries


# --- CUPTI of whole calls (several programs and eager ops), kernel by kernel ---------------------


class AsIs:
    """`fn` in a form `profiler.measure` runs as it is: it jits whatever is not a `jax.stages.Wrapped`
    (a protocol: `__call__`, `trace`, `lower`), which would fold several jitted calls and their eager
    ops into one program. So CUPTI sees the kernels of exactly the call the wall clock times."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def trace(self, *args, **kwargs):
        raise NotImplementedError("run as it is, not traced")

    def lower(self, *args, **kwargs):
        raise NotImplementedError("run as it is, not lowered")


def _cupti_failed(err: Exception, state: dict) -> None:
    message = f"{type(err).__name__}: {str(err)[:300]}"
    if profiler is None or "not supported" in str(err):
        state["error"] = message  # no CUPTI here: not tried again
    else:
        state.setdefault("failures", []).append(message)


def _kernel_times(fn) -> list[tuple[str, float]]:
    """CUPTI's `(kernel name, ms)` of one `fn()` call, after a warm-up call outside CUPTI."""
    if profiler is None:
        raise RuntimeError("jax.experimental.mosaic.gpu.profiler could not be imported")
    _, timings = profiler.measure(AsIs(fn), aggregate=False)()
    if not timings:
        raise RuntimeError("no kernel was launched")
    return timings


def breakdown(timings: list[tuple[str, float]], per: int, top: int = 12) -> dict:
    """Kernel launches, seconds and the `top` kernel names by time (with launches), per `per`."""
    seconds, launches = Counter(), Counter()
    for name, ms in timings:
        seconds[name] += ms / 1e3 / per
        launches[name] += 1 / per
    total = sum(seconds.values())
    ranked = [
        dict(name=name[:200], seconds=t, share=t / total if total else None, launches=launches[name])
        for name, t in seconds.most_common(top)
    ]
    return dict(launches=len(timings) / per, seconds=total, distinct=len(seconds), top=ranked)


def cupti_profile(fn, reps: int, state: dict, per: int = 1, kernels: bool = False) -> dict | None:
    """CUPTI kernel seconds of `fn()` per `per` (steps of a loop): the median of `reps` measurements
    (`seconds`), each one call after a warm-up call (`measure(iterations=N)` insists on the same
    kernel order in every iteration, which several programs and eager ops on the GPU do not keep),
    and with `kernels` the first one's `breakdown`. None where CUPTI is not there (recorded once in
    `state["error"]`) or a measurement failed (`state["failures"]`)."""
    if state["error"] is not None:
        return None
    try:
        runs = [_kernel_times(fn) for _ in range(reps)]
    except Exception as err:  # the wall-clock figures stand without it
        _cupti_failed(err, state)
        return None
    samples = [sum(ms for _, ms in run) / 1e3 / per for run in runs]
    out = dict(seconds=statistics.median(samples), samples=samples)
    if kernels:
        out["kernels"] = breakdown(runs[0], per)
    return out
