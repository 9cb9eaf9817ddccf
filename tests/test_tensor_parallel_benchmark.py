"""The tensor-parallel benchmark end to end on the 8 CPU devices at tiny sizes: correctness phase and JSON."""

import json

import jax
import pytest

from benchmarks import tensor_parallel


def test_tiny_run_passes_correctness_and_writes_json(tmp_path):
    if jax.default_backend() != "cpu" and len(jax.devices()) != 8:
        pytest.skip(f"needs 8 devices of one backend; {jax.default_backend()} has {len(jax.devices())}")
    assert len(jax.devices()) == 8, "conftest sets 8 host devices"
    out = tmp_path / "tensor_parallel_cpu.json"
    # P = 8 (every weight split over all devices) against P = 1 keeps the test fast; the script's
    # default runs 1, 2, 4 and 8.
    tensor_parallel.main(["--tiny", "--layers", "1", "--tp", "1", "8", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["tp_sizes"] == [1, 8]
    assert result["nccl_nvls_enable"] == "0"
    correctness = result["correctness"]
    assert correctness["passed"] and all(check["passed"] for check in correctness["checks"])
    names = [check["check"] for check in correctness["checks"]]
    for parts in (8,):
        for scheme in tensor_parallel.SCHEMES:
            # Bit-exact activation codes in both row-parallel layers, and both whole workloads.
            assert f"P={parts} fp8 {scheme} down row-parallel: codes and scales differing" in names
            assert f"P={parts} fp8 {scheme} o row-parallel: codes and scales differing" in names
            assert any(name.startswith(f"P={parts} fp8 {scheme} block: rms") for name in names)
    codes = [c for c in correctness["checks"] if "codes" in c["check"]]
    assert codes and all(c["error"] == 0 for c in codes)

    rows = result["results"]
    assert len(rows) == 2 * 2 * 4  # TP sizes x workloads x (bf16 + 3 fp8 schemes)
    fields = {
        "workload", "tp", "dtype", "scheme", "layer_ms", "tokens_per_s", "tflops", "collective_ms",
        "collective_share", "efficiency", "speedup_vs_bf16", "above_peak",
    }  # fmt: skip
    for row in rows:
        assert fields <= row.keys()
        assert row["layer_ms"] > 0 and row["tokens_per_s"] > 0
        assert (row["collective_ms"] > 0) == (row["tp"] > 1)
        if row["tp"] == 1:
            assert row["efficiency"] == 1.0
    assert {(r["dtype"], r["scheme"]) for r in rows} == {("bf16", None)} | {("fp8", s) for s in tensor_parallel.SCHEMES}
