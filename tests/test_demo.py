"""The demo (README's main command): every scheme runs, names its GEMM path and is accurate."""

from w8a8_jax import demo, platform

PATHS = {
    "bf16 (no quantization)": "XLA dot_general",
    "dynamic per-tensor x per-tensor W": "xla_per_tensor_w8a8_scaled_mm",
    "dynamic per-token x per-channel W": "xla_per_token_w8a8_scaled_mm",
    "static x per-channel W": "xla_channelwise_w8a8_scaled_mm",
}


def test_demo_rows(monkeypatch, capsys):
    for backend in demo.SIZES:  # small on every backend
        monkeypatch.setitem(demo.SIZES, backend, (16, 256, 512))
    rows = list(demo.run(seed=1))
    # bf16, the three unfused fp8 schemes, the fused one where a fused kernel is registered, block.
    assert [row["scheme"] for row in rows[:4]] == list(PATHS), rows
    assert len(rows) == (6 if platform.fused_fp8_supported() else 5), rows
    for row in rows[:4]:
        assert row["path"] == PATHS[row["scheme"]], row
    assert rows[-1]["scheme"] == "per-token group x 128x128-block W"
    assert rows[-1]["path"].startswith("xla_block_"), rows[-1]
    errors = [row["error"] for row in rows]
    # fp8 e4m3 keeps 3 mantissa bits: ~6% relative error through the block; bf16 well under that.
    assert errors[0] < 0.02 and all(0.01 < e < 0.12 for e in errors[1:]), errors
    assert all(row["seconds"] > 0 for row in rows)
    demo.main(seed=1)  # prints one line per row
    printed = capsys.readouterr().out
    assert all(row["scheme"] in printed and row["path"] in printed for row in rows), printed
