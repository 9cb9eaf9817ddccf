"""The demo (README's main command): every scheme runs, names its GEMM path and is accurate."""

from w8a8_jax import demo, platform


def test_demo_rows(monkeypatch, capsys):
    for backend in demo.SIZES:  # small on every backend
        monkeypatch.setitem(demo.SIZES, backend, (16, 256, 512))
    demo.main(seed=1)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "e-0" in line]
    # bf16, the three unfused fp8 schemes, and the fused one where a fused kernel is registered.
    assert len(rows) == (5 if platform.fused_fp8_supported() else 4), lines
    for name in ("XLA dot_general", "xla_per_tensor_w8a8_scaled_mm", "xla_per_token_w8a8_scaled_mm"):
        assert any(name in row for row in rows), (name, lines)
    errors = [float(row.split()[-2]) for row in rows]
    # fp8 e4m3 keeps 3 mantissa bits: ~6% relative error through the block; bf16 well under that.
    assert errors[0] < 0.02 and all(0.01 < e < 0.12 for e in errors[1:]), errors
