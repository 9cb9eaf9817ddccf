"""The Hopper block-GEMM benchmark on CPU: the whole check/GEMM/end-to-end path at tiny shapes (the
kernel in interpret mode, no torch, no CUPTI), and the derived figures on a hand-made row."""

import dataclasses
import functools
import json
import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import block_kernel  # noqa: E402

from w8a8_jax.kernels import gpu  # noqa: E402
from w8a8_jax.kernels.gpu import block_scaled_mm as gpu_block  # noqa: E402
from w8a8_jax.kernels.gpu import group_quant  # noqa: E402


def test_derived_figures_and_ratios():
    times = {
        "ours_block": dict(wall_s=2e-6, cupti_s=1e-6, drift=0.03),
        "xla_block": dict(wall_s=6e-6, drift=-0.01),
        "xla_bf16": dict(wall_s=8e-6, drift=0.0),
        "torch_block": dict(wall_s=3e-6),
        "torch_bf16": dict(wall_s=4e-6),
        "broken": dict(error="x"),
    }
    d = block_kernel.derived(dict(m=16, k=1024, n=2048, times=times))
    flops = 2.0 * 16 * 1024 * 2048
    assert d["tflops"]["ours_block"] == pytest.approx(flops / 2e-6 / 1e12)
    assert d["cupti_tflops"] == {"ours_block": pytest.approx(flops / 1e-6 / 1e12)}
    assert d["weight_tbps"]["ours_block"] == pytest.approx(1024 * 2048 / 2e-6 / 1e12)
    assert d["weight_tbps"]["torch_bf16"] == pytest.approx(2 * 1024 * 2048 / 4e-6 / 1e12)
    assert d["ratios"] == {
        "ours_block/torch_block": pytest.approx(1.5),
        "ours_block/xla_block": pytest.approx(3.0),
        "xla_bf16/torch_bf16": pytest.approx(0.5),
    }
    assert d["max_drift"] == pytest.approx(0.03)
    assert "weight_tbps" not in block_kernel.derived(dict(m=128, k=1024, n=2048, times=times))


def test_main_runs_the_check_gemm_and_e2e_rows_on_cpu(tmp_path, monkeypatch, capsys):
    interpret = functools.partial(gpu_block.block_scaled_mm, interpret=True)
    monkeypatch.setattr(block_kernel, "torch", None)
    monkeypatch.setattr(block_kernel.gpu_block, "block_scaled_mm", interpret)
    quant = functools.partial(group_quant.per_token_group_quant, interpret=True)
    monkeypatch.setattr(block_kernel.group_quant, "per_token_group_quant", quant)
    kernel = dataclasses.replace(gpu.FUSED_KERNEL, block_scaled_mm=interpret, per_token_group_quant=quant)
    monkeypatch.setattr(block_kernel.gpu, "FUSED_KERNEL", kernel)
    monkeypatch.setattr(block_kernel, "CHECKS", ((5, 200, 130, True, jnp.bfloat16),))
    path = tmp_path / "block_kernel.json"
    argv = ["--skip-cupti", "--ms", "3", "--kn", "256", "384", "--r", "2", "--reps", "2", "--calls", "2"]
    argv += ["--e2e", "--e2e-ms", "80", "--quant-shapes", "3", "256", "--overlapped", "--json", str(path)]
    block_kernel.main(argv)
    saved = json.loads(path.read_text())
    assert saved[0]["kind"] == "run" and "--ms 3" in saved[0]["command"]
    checks = [r for r in saved if r["kind"] == "block_check"]
    schedules = [c["schedule"] for c in checks]
    # The default (the swapped decode schedule at M = 5), the large-M one, the weight scales
    # pipelined, overlapped promotion.
    assert schedules[0] == "default"
    kinds = [(s["swap_ab"], s["pipelined_weight_scales"], s["overlap_promotion"]) for s in schedules[1:]]
    assert kinds == [(False, False, False), (True, True, False), (True, False, True)]
    assert all(c["ok"] and c["err"] <= c["tol"] for c in checks)
    (row,) = [r for r in saved if r["kind"] == "block"]
    assert (row["m"], row["k"], row["n"], row["torch"]) == (3, 256, 384, "not installed")
    variants = {"ours_block", "ours_large_m", "ours_pipelined_scales", "ours_overlapped", "xla_block", "xla_bf16"}
    assert set(row["times"]) == variants
    assert row["schedule"]["swap_ab"]
    assert all(t["wall_s"] > 0 and t["cupti_s"] is None for t in row["times"].values())
    (e2e,) = [r for r in saved if r["kind"] == "block_e2e"]
    assert set(e2e["times"]) == {"op_kernel", "op_xla_quant", "op_xla", "xla_bf16"}
    assert e2e["plans"] == {
        "op_kernel": ["kernel.per_token_group_quant", "kernel.block_scaled_mm"],
        "op_xla_quant": ["quantize_per_token_group", "kernel.block_scaled_mm"],
        "op_xla": ["quantize_per_token_group", "xla_block_dequant_w8a8_scaled_mm"],
    }
    launches = e2e["launches"]  # the overrides reached the compiled programs
    assert launches["op_kernel"] != launches["op_xla_quant"] != launches["op_xla"]
    (quant,) = [r for r in saved if r["kind"] == "group_quant"]
    assert quant["identical"] is True and set(quant["TBps"]) == {"ours", "xla", "copy"}
    assert "checks: 4/4 passed" in capsys.readouterr().out


def test_entry_kernels_counts_what_the_program_launches():
    text = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %s = f32[4]{0} sine(f32[4]{0} %p)
}

ENTRY %main (a: f32[4], b: f32[4,4]) -> (f32[4], f32[4,4]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %fusion = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused
  %custom-call = f32[4,4]{1,0} custom-call(f32[4,4]{1,0} %b), custom_call_target="mosaic_gpu_v2"
  %copy = f32[4,4]{0,1} copy(f32[4,4]{1,0} %custom-call)
  %bitcast = f32[4]{0} bitcast(f32[4]{0} %fusion)
  ROOT %tuple = (f32[4]{0}, f32[4,4]{0,1}) tuple(f32[4]{0} %bitcast, f32[4,4]{0,1} %copy)
}
"""
    assert block_kernel.entry_kernels(text) == {"fusion:kLoop": 1, "custom-call:mosaic_gpu_v2": 1, "copy": 1}


def test_lean_rows_time_the_default_schedule_xla_bf16_and_torch_only(tmp_path, monkeypatch):
    interpret = functools.partial(gpu_block.block_scaled_mm, interpret=True)
    monkeypatch.setattr(block_kernel, "torch", None)
    monkeypatch.setattr(block_kernel.gpu_block, "block_scaled_mm", interpret)
    path = tmp_path / "block_kernel.json"
    argv = ["--lean", "--skip-checks", "--skip-quant", "--skip-cupti", "--ms", "130", "--kn", "256", "384"]
    block_kernel.main(argv + ["--r", "2", "--reps", "1", "--calls", "1", "--json", str(path)])
    (row,) = [r for r in json.loads(path.read_text()) if r["kind"] == "block"]
    assert set(row["times"]) == {"ours_block", "xla_bf16"}
    assert row["derived"]["tflops"]["ours_block"] > 0
