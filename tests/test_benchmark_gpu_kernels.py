"""The GPU benchmark and its timing harness on CPU: the whole GEMM/quant path at tiny shapes (the
kernels in interpret mode, no torch, no CUPTI), and the derived figures on a hand-made row."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import gpu_kernels  # noqa: E402
import timing  # noqa: E402

from w8a8_jax.kernels.gpu import quant, scaled_mm  # noqa: E402


def test_compare_times_jax_twice_around_torch_and_keeps_failures():
    inputs = [(jnp.full((8, 8), float(i)),) for i in range(3)]
    order = []

    def jax_fn(x):
        order.append("jax")
        return x @ x

    def failing(x):
        raise ValueError("no such path")

    entries = timing.compare(
        {"ok": timing.Variant(jax_fn, inputs), "bad": timing.Variant(failing, inputs)},
        {},
        calls=2,
        repeats=2,
        cupti=True,
        device="cpu",
    )
    ok = entries["ok"]
    assert order == ["jax"] * len(inputs)  # traced once per operand set of the loop, never again
    assert ok["wall_s"] > 0 and ok["first"]["median"] > 0 and ok["second"]["median"] > 0
    assert ok["first"]["min"] <= ok["first"]["median"] <= ok["first"]["max"]
    assert ok["drift"] == pytest.approx(ok["second"]["median"] / ok["first"]["median"] - 1)
    if jax.default_backend() == "cpu":  # no CUPTI off CUDA: recorded, the wall clock stands
        assert ok["cupti_s"] is None and ok["cupti_error"]
    assert "no such path" in entries["bad"]["error"]


def test_wall_samples_are_per_operand_set_over_the_calls():
    inputs = [jnp.ones((4, 4))] * 4
    samples = timing.wall_samples(timing.looped(lambda x: x + 1), inputs, reps=3, calls=2)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    stats = timing.summary([1.0, 2.0, 4.0])
    assert stats == dict(median=2.0, min=1.0, max=4.0, spread=1.5)


def row(m, times, plan_rowwise="fused_w8a8_scaled_mm", plan_tensor="fused_w8a8_scaled_mm"):
    return dict(kind="gemm", m=m, k=1024, n=2048, times=times, plan_rowwise=plan_rowwise, plan_tensor=plan_tensor)


def test_derived_ratios_follow_the_plan_and_the_peaks_arithmetic():
    t = {
        "ours_rowwise": dict(wall_s=2e-6, cupti_s=1e-6, drift=0.02),
        "ours_tensor": dict(wall_s=2.5e-6, drift=-0.05),
        "xla_rowwise": dict(wall_s=4e-6, drift=0.0),
        "xla_tensor": dict(wall_s=3e-6, drift=0.0),
        "xla_bf16": dict(wall_s=8e-6, drift=0.0),
        "torch_rowwise": dict(wall_s=3e-6),
        "torch_tensor": dict(wall_s=2e-6),
        "torch_bf16": dict(wall_s=4e-6),
        "broken": dict(error="x"),
    }
    d = gpu_kernels.derived(row(16, t))
    flops = 2.0 * 16 * 1024 * 2048
    assert d["tflops"]["ours_rowwise"] == pytest.approx(flops / 2e-6 / 1e12)
    assert d["cupti_tflops"] == {"ours_rowwise": pytest.approx(flops / 1e-6 / 1e12)}
    assert d["weight_tbps"]["ours_rowwise"] == pytest.approx(1024 * 2048 / 2e-6 / 1e12)
    assert d["weight_tbps"]["xla_bf16"] == pytest.approx(2 * 1024 * 2048 / 8e-6 / 1e12)  # 2 bytes a weight
    assert d["ratios"]["ours_rowwise/torch_rowwise"] == pytest.approx(1.5)
    assert d["ratios"]["plan_tensor/torch_tensor"] == pytest.approx(0.8)  # the kernel's per-tensor row
    assert d["max_drift"] == pytest.approx(0.05)
    assert "broken" not in d["tflops"]

    xla = gpu_kernels.derived(row(16, t, "xla_per_token_w8a8_scaled_mm", "xla_per_tensor_w8a8_scaled_mm"))
    assert xla["ratios"]["plan_rowwise/torch_rowwise"] == pytest.approx(0.75)
    assert xla["ratios"]["plan_tensor/torch_tensor"] == pytest.approx(2 / 3)
    assert "weight_tbps" not in gpu_kernels.derived(row(128, t))


def test_main_runs_the_gemm_and_quant_rows_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_kernels, "torch", None)
    monkeypatch.setattr(gpu_kernels.gpu_mm, "scaled_mm", functools.partial(scaled_mm.scaled_mm, interpret=True))
    monkeypatch.setattr(
        gpu_kernels.gpu_quant, "per_token_quant", functools.partial(quant.per_token_quant, interpret=True)
    )
    path = tmp_path / "gpu_kernels.json"
    argv = ["--skip-checks", "--skip-cupti", "--ms", "3", "--kn", "256", "256", "--r", "2"]
    argv += ["--reps", "2", "--calls", "2", "--quant-shapes", "4", "256", "--json", str(path)]
    gpu_kernels.main(argv)
    saved = json.loads(path.read_text())
    assert saved[0]["kind"] == "run" and "--ms 3" in saved[0]["command"]
    (gemm,) = [r for r in saved if r["kind"] == "gemm"]
    assert (gemm["m"], gemm["k"], gemm["n"], gemm["torch"]) == (3, 256, 256, "not installed")
    assert set(gemm["times"]) == {
        "ours_rowwise",
        "ours_large_m",
        "xla_rowwise",
        "xla_tensor",
        "xla_bf16",
    }
    assert gemm["schedule"]["swap_ab"]  # M = 3: the swapped decode schedule is the default
    assert all(t["wall_s"] > 0 and t["cupti_s"] is None for t in gemm["times"].values())
    assert gemm["plan_rowwise"] == "xla_per_token_w8a8_scaled_mm"  # no fused kernel on CPU
    (q,) = [r for r in saved if r["kind"] == "quant"]
    assert (q["m"], q["k"]) == (4, 256) and set(q["TBps"]) >= {"ours", "xla", "copy"}
    assert "GEMM, bf16 out" in capsys.readouterr().out


def test_profile_launcher_operands_carry_each_kind_of_scale():
    import profile_gemm

    a, w, scale_a, scale_w = profile_gemm.operands(5, 300, 130)
    assert (a.shape, w.shape, scale_a.shape, scale_w.shape) == ((5, 300), (130, 300), (5, 1), (130, 1))
    a, w, scale_a, scale_w = profile_gemm.operands(5, 300, 130, block=True)
    assert (scale_a.shape, scale_w.shape) == ((5, 3), (2, 3))  # (M, ceil(K/128)), (ceil(N/128), ceil(K/128))
    assert a.dtype == w.dtype == np.uint8 and (scale_a > 0).all() and (scale_w > 0).all()
