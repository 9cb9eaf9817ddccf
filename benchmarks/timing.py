"""Timing helpers shared by the GPU benchmarks.

JAX: a jitted loop over R distinct operand sets returns all R outputs (so XLA can neither merge
nor drop calls); it is timed by CUPTI (`jax.experimental.mosaic.gpu.profiler`: the GPU time of the
kernels it launches, without JAX's dispatch) and by wall clock (dispatch and the host round trip
counted). torch: the same R calls back to back, timed by CUDA events or by wall clock. Every figure
is a median over repeated loops, divided by R. DLPack shares JAX arrays with torch without a copy
of the data a benchmark times (fp8 travels as a uint8 view and is reinterpreted on the torch side).
"""

import statistics
import time

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler


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


def wall_seconds(call, inputs, reps):
    """Median wall-clock seconds per operand set of `call(inputs)` (a warmed-up jitted or compiled
    loop over the R sets), one loop a sample, `block_until_ready` each."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(call(inputs))
        times.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(times)


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


def time_torch_wall(fn, inputs, reps, device="cuda"):
    """Median wall-clock seconds per call of fn over the R inputs: one warm-up loop, then each
    sample is the R calls back to back and a synchronize."""
    for x in inputs:
        fn(x)
    torch_sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        torch_sync(device)
        times.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(times)


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
