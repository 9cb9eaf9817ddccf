"""The block-fp8 benchmark on CPU: its main path at tiny shapes (no torch, no CUPTI), its float64
checker (which must pass on the right scales and fail on a wrong one), its budget variants."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import block_fp8  # noqa: E402

from w8a8_jax import block_scaled_mm  # noqa: E402

JAX_PATHS = (
    "xla_block",
    "xla_block_budget_4KiB",
    "xla_block_scan",
    "xla_block_dequant_x6",
    "xla_block_dequant_x3",
    "block_fp8_matmul",
    "xla_bf16",
    "xla_per_channel_fp8",
)
TORCH_PATHS = ("torch_blockwise", "torch_rowwise_fp8", "torch_bf16")


def _operands(key, m, k, n):
    ka, kw = jax.random.split(key)
    act = block_fp8.make_activations(ka, m, k, 1)[0]
    wt = block_fp8.make_weights(kw, k, n, 1)[0]
    return act, wt


def test_main_runs_on_cpu_without_torch_or_cupti(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(block_fp8, "torch", None)
    path = tmp_path / "block_fp8.json"
    argv = ["--kn", "256", "320", "--ms", "1", "5", "--check", "12", "640", "320", "--reps", "2"]
    argv += ["--r-small", "2", "--r-large", "2", "--budgets", "4KiB", "1GiB", "--json", str(path)]
    results = block_fp8.main(argv)
    saved = json.loads(path.read_text())
    assert saved["config"]["ms"] == [1, 5] and saved["config"]["kn"] == [[256, 320]]
    # The package default (1 GiB) is xla_block itself: only the 4 KiB budget is a row of its own.
    assert saved["config"]["budgets"] == ["4KiB"]

    checks = {c["path"]: c for c in saved["checks"]}
    for name in (*JAX_PATHS, "xla_block_chunked_check"):
        assert checks[name]["ok"] is True, checks[name]
        assert 0 <= checks[name]["err"] <= checks[name]["tol"]
    for name in TORCH_PATHS:
        assert checks[name]["ok"] is None and "not installed" in checks[name]["unavailable"]

    rows = {r["m"]: r for r in saved["rows"]}
    assert sorted(rows) == [1, 5] and not saved["skipped"]
    for m, row in rows.items():
        assert (row["k"], row["n"], row["r"]) == (256, 320, 2)
        assert set(row["paths"]) == set(JAX_PATHS) | set(TORCH_PATHS)
        # On CPU block_fp8_matmul plans the dequantized GEMM, not the per-k-block path: timed itself.
        assert row["paths"]["block_fp8_matmul"]["status"] == "ok"
        for name in TORCH_PATHS:
            assert row["paths"][name]["status"] == "unavailable"
        for name in ("xla_block", "xla_block_scan", "xla_bf16", "xla_per_channel_fp8"):
            entry = row["paths"][name]
            assert entry["status"] == "ok", entry
            assert entry["check"]["ok"] and entry["wall_s"] > 0 and entry["cupti_s"] is None
            assert entry["temp_bytes"] >= 0 and entry["compile_s"] > 0
            assert entry["wall"]["tflops"] > 0 and "tbps" in entry["wall"]  # M <= 128: bytes/s too
        assert "xla_bf16/xla_block" in row["ratios"]
    # One row (M = 1) is one chunk under any budget; 5 rows under 4 KiB (2.5 KiB a row) are 5 chunks.
    assert rows[1]["paths"]["xla_block_budget_4KiB"] == {"status": "same_as", "same_as": "xla_block"}
    assert rows[5]["paths"]["xla_block_budget_4KiB"]["status"] == "ok"
    assert "not supported" in saved["cupti"]
    assert results["rows"][0]["paths"]["xla_block"]["wall_s"] == saved["rows"][0]["paths"]["xla_block"]["wall_s"]

    printed = capsys.readouterr().out
    table = printed[printed.index("ms per call") :]
    assert (
        "TFLOP/s by wall clock" in table
        and "checks: 9/12 passed, 0 gave wrong numbers, 0 raised, 3 unavailable" in table
    )


def test_checker_passes_the_right_scales_and_fails_a_wrong_one(key):
    m, k, n = 9, 640, 320  # a partial weight block (320 = 2.5 x 128), 5 k-blocks
    act, wt = _operands(key, m, k, n)
    q, w, sa, sb = (np.asarray(x) for x in block_fp8._block_operands(act, wt))
    out = jax.jit(block_fp8.xla_block)(*block_fp8._block_operands(act, wt))
    ref = block_fp8.block_reference(q, w, sa, sb)
    assert block_fp8.check_output(out, ref, k)["ok"]

    wrong = sb.copy()
    wrong[2, 3] *= 2  # one 128x128 weight block's scale (the partial one) off by 2x
    bad = block_fp8.check_output(out, block_fp8.block_reference(q, w, sa, wrong), k)
    assert not bad["ok"] and bad["err"] > 10 * bad["tol"]
    # The same with the wrong scale fed to the GEMM instead of the reference.
    out_wrong = jax.jit(block_fp8.xla_block)(act["q"], wt["w"], act["sa"], jnp.asarray(wrong))
    assert not block_fp8.check_output(out_wrong, ref, k)["ok"]
    # An activation group's scale, and a transposed layout of the weight scales.
    wrong_a = sa.copy()
    wrong_a[4, 1] *= 1.5
    assert not block_fp8.check_output(out, block_fp8.block_reference(q, w, wrong_a, sb), k)["ok"]
    shuffled = sb[::-1].copy()
    assert not block_fp8.check_output(out, block_fp8.block_reference(q, w, sa, shuffled), k)["ok"]
    # A shape mismatch is a failure, not an exception.
    assert not block_fp8.check_output(np.asarray(out)[:, :-1], ref, k)["ok"]


def test_references_of_each_kind_match_a_direct_float64_product(key):
    m, k, n = 3, 384, 256
    act, wt = _operands(key, m, k, n)
    a = {name: np.asarray(x, np.float64) for name, x in act.items()}
    w = {name: np.asarray(x, np.float64) for name, x in wt.items()}
    refs = block_fp8.references(
        block_fp8.kblock_products(np.asarray(act["q"]), block_fp8.kblock_codes(np.asarray(wt["w"]))),
        a["sa"],
        w["sb"],
        a["sa_row"],
        w["sb_row"],
    )
    plain = a["q"] @ w["w"].T
    np.testing.assert_allclose(refs["bf16"], plain, rtol=1e-12)
    np.testing.assert_allclose(refs["per_channel"], plain * a["sa_row"] * w["sb_row"].T, rtol=1e-12)
    dequant_a = a["q"] * np.repeat(a["sa"], 128, axis=1)
    dequant_w = w["w"] * np.repeat(np.repeat(w["sb"], 128, axis=0), 128, axis=1)
    np.testing.assert_allclose(refs["block"], dequant_a @ dequant_w.T, rtol=1e-12)


@pytest.mark.parametrize("m", [1, 7, 12])
def test_scan_formulation_matches_the_reference(key, m):
    k, n = 640, 320
    act, wt = _operands(key, m, k, n)
    ops = block_fp8._block_operands(act, wt)
    out = jax.jit(block_fp8.xla_block_scan)(*ops)
    assert block_fp8.check_output(out, block_fp8.block_reference(*(np.asarray(x) for x in ops)), k)["ok"]


def test_budget_variant_chunks_the_rows_and_restores_the_constant(key):
    m, k, n = 12, 256, 128  # 2 k-blocks x 128 columns x 4 bytes = 1 KiB a row
    act, wt = _operands(key, m, k, n)
    ops = block_fp8._block_operands(act, wt)
    default = block_scaled_mm.PARTIAL_PRODUCT_BYTES
    small = block_fp8.xla_block_with_budget(5 << 10)  # 5 rows a chunk: 3 chunks, 3 padding rows
    assert "scan" in str(jax.make_jaxpr(small)(*ops))  # lax.map over the chunks
    assert "scan" not in str(jax.make_jaxpr(block_fp8.xla_block_with_budget(1 << 30))(*ops))
    assert block_scaled_mm.PARTIAL_PRODUCT_BYTES == default
    np.testing.assert_array_equal(np.asarray(jax.jit(small)(*ops)), np.asarray(jax.jit(block_fp8.xla_block)(*ops)))
    same = block_fp8.same_program_as([5 << 10, 6 << 10, 12 << 10, 4 << 30], ops)
    # 12 KiB and 4 GiB hold all 12 rows: xla_block's program; 6 KiB (6 rows, 2 chunks) differs from 5 KiB.
    assert same == {"xla_block_budget_12KiB": "xla_block", "xla_block_budget_4GiB": "xla_block"}


def test_torch_blockwise_forms_name_distinct_layouts():
    assert block_fp8.blockwise_forms(128, 56) == [("scaled_mm", True, False), ("functional", True, False)]
    keys = {block_fp8.form_key(f, 128, 56) for f in block_fp8.blockwise_forms(128, 56)}
    assert keys == {"scaled_mm", "functional"}  # k-blocks a multiple of 4: padded == unpadded
    keys = [block_fp8.form_key(f, 1, 5) for f in block_fp8.blockwise_forms(1, 5)]
    assert keys == [
        "scaled_mm+kblocks_pad4",
        "scaled_mm+kblocks_unpadded",
        "scaled_mm+kblocks_pad4+rows_pad4",
        "functional+kblocks_pad4",
        "functional+kblocks_pad4+rows_pad4",
    ]


def test_figures_flag_a_time_above_the_peaks():
    m, k, n = 16, 7168, 24576
    fine = block_fp8.figures("xla_block", 1e-4, m, k, n)
    assert fine["tflops"] == pytest.approx(2 * m * k * n / 1e-4 / 1e12) and "above_peak" not in fine
    assert fine["tbps"] == pytest.approx(block_fp8.min_bytes("xla_block", m, k, n) / 1e-4 / 1e12)
    fast = block_fp8.figures("xla_block", 1e-6, m, k, n)  # 176 MB of weight in 1 us
    assert any("HBM" in flag for flag in fast["above_peak"])
    big = block_fp8.figures("xla_bf16", 1e-4, 4096, 7168, 24576)  # 14.4 PFLOP/s
    assert "tbps" not in big and any("989" in flag for flag in big["above_peak"])
