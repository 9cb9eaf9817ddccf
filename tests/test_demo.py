"""The demo (README's main command): every scheme runs, names its GEMM path and is accurate."""

from w8a8_jax import demo


def test_demo_rows(monkeypatch, capsys):
    monkeypatch.setitem(demo.SIZES, "cpu", (16, 256, 512))
    demo.main(seed=1)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "e-0" in line]
    assert len(rows) == 4, lines  # bf16 and the three unfused fp8 schemes (no fused kernel on CPU)
    for name in ("XLA dot_general", "xla_per_tensor_w8a8_scaled_mm", "xla_per_token_w8a8_scaled_mm"):
        assert any(name in row for row in rows), (name, lines)
    errors = [float(row.split()[-2]) for row in rows]
    # fp8 e4m3 keeps 3 mantissa bits: ~6% relative error through the block; bf16 well under that.
    assert errors[0] < 0.02 and all(0.01 < e < 0.12 for e in errors[1:]), errors
