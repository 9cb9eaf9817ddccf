"""The GPU benchmark's routing summary, on hand-made timings (the timing itself needs a GPU)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import gpu_kernels  # noqa: E402


def row(m, ours, xla_tensor, xla_rowwise, kind="gemm"):
    return dict(kind=kind, m=m, k=4096, n=6144, ours_rowwise=ours, xla_tensor=xla_tensor, xla_rowwise=xla_rowwise)


def test_kernel_wins_needs_the_margin_over_the_faster_xla_path():
    results = [
        row(1024, 1.00, 1.10, 1.04),  # 4% faster than the faster XLA path: a win
        row(2048, 1.00, 1.10, 1.02),  # 2% only
        row(4096, 1.00, None, 1.05),  # a failed XLA variant is left out
        row(8192, None, 2.0, 2.0),  # the kernel failed
        row(16, 1.00, 9.0, 9.0, kind="quant"),
    ]
    assert gpu_kernels.kernel_wins(results) == [(1024, 4096, 6144), (4096, 4096, 6144)]


def test_timing_helpers_come_from_the_shared_module_and_run_on_cpu():
    import jax
    import jax.numpy as jnp
    import pytest
    import timing

    assert (gpu_kernels.time_jax, gpu_kernels.time_jax_wall, gpu_kernels.time_torch) == (
        timing.time_jax,
        timing.time_jax_wall,
        timing.time_torch,
    )
    inputs = [jnp.full((8, 8), float(i)) for i in range(3)]
    assert timing.time_jax_wall(lambda x: x @ x, inputs, 2) > 0
    compiled, seconds = timing.compile_looped(lambda x: x + 1, inputs)
    assert seconds > 0 and [float(y[0, 0]) for y in compiled(inputs)] == [1.0, 2.0, 3.0]
    assert timing.wall_seconds(compiled, inputs, 2) > 0
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError):  # no CUPTI off CUDA
            timing.time_jax(lambda x: x @ x, inputs, 2)
