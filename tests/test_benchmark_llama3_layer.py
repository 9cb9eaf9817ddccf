"""The Llama-3 layer benchmark on CPU: its main path with `--smoke` (2 layers, every variant and phase,
no CUPTI) into a JSON file whose structure and figures are checked; the XLA-quant override traced in,
shown with a stand-in fused kernel; the speed-up arithmetic and the kernel-name buckets on
hand-made input; the full-size settings."""

import json
import math
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import llama3_layer  # noqa: E402

from w8a8_jax import dispatch, platform, quantization, scaled_mm  # noqa: E402

PROJECTIONS = 7  # q, k, v, o, gate, up, down
FP8_GEMMS = {
    *(f.__name__ for f in (scaled_mm.xla_per_tensor_w8a8_scaled_mm, scaled_mm.xla_per_token_w8a8_scaled_mm,
                           scaled_mm.xla_channelwise_w8a8_scaled_mm, scaled_mm.fused_w8a8_scaled_mm)),
    dispatch.KERNEL_QUANT_SCALED_MM,
}  # fmt: skip


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3_layer") / "llama3_layer.json"
    results = llama3_layer.main(["--smoke", "--reps", "2", "--calls", "2", "--out", str(path)])
    return results, json.loads(path.read_text())


def test_smoke_run_records_every_phase_and_variant(smoke):
    results, saved = smoke
    config, phases = llama3_layer.SMOKE_CONFIG, llama3_layer.SMOKE.phases()
    layers = config.num_hidden_layers
    assert not saved["errors"] and not saved["skipped"], (saved["errors"], saved["skipped"])
    assert saved["device"] == jax.devices()[0].device_kind and saved["jax"] == jax.__version__
    assert "--smoke" in saved["command"] and saved["config"]["smoke"] is True and saved["config"]["layers"] == layers
    assert list(saved["phases"]) == ["prefill", "decode_b1", "decode_b2"] == list(phases)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        assert "not supported" in saved["cupti"] and saved["fused_kernel"]["registered"] is False
    bf16_bytes = saved["models"]["bf16"]["weight_bytes_per_layer"]

    for name, entry in saved["phases"].items():
        phase = phases[name]
        assert saved["config"]["phases"][name] == dict(
            batch=phase.batch, tokens=phase.tokens, position=phase.position, cache_length=phase.cache_length
        )
        assert set(entry["variants"]) == set(llama3_layer.VARIANTS)
        for variant, result in entry["variants"].items():
            assert result["output_finite"] is True and _positive(result["output_std"])
            assert _positive(result["wall_s"]) and len(result["wall_samples_s"]) == 2
            assert result["wall"]["median"] == result["wall_s"] and result["ms_per_layer"] == 1e3 * result["wall_s"]
            assert result["tokens_per_s"] == pytest.approx(phase.rows / result["wall_s"])
            if on_cpu:
                assert result["cupti"] is None and result["cupti_s"] is None
            if phase.tokens == 1:
                assert result["kv_cache_bytes"] == llama3_layer.kv_cache_bytes(config, phase)
                assert result["weight_tbps"] == pytest.approx(result["weight_bytes"] / result["wall_s"] / 1e12)

            plans = result["plans"]
            if variant == "bf16":
                assert plans == [] and result["plan_counts"] == {} and result["weight_bytes"] == bf16_bytes
                continue
            # One byte a weight and its float32 scales, against two bytes.
            assert bf16_bytes / 2 < result["weight_bytes"] < bf16_bytes
            assert len(plans) == PROJECTIONS * layers and {p["m"] for p in plans} == {phase.rows}
            assert {p["gemm"] for p in plans} <= FP8_GEMMS, plans
            quantizers = {p["quantizer"] for p in plans}
            if variant == "channel-token-xla-quant":
                assert quantizers == {dispatch.XLA_QUANTIZERS["dynamic_per_token"]}
            elif variant == "tensor-static":
                assert quantizers == {dispatch.XLA_QUANTIZERS["static"]}
            elif on_cpu:  # no per-token quant kernel here either
                assert quantizers == {dispatch.XLA_QUANTIZERS["dynamic_per_token"]}

        derived = entry["derived"]
        assert set(derived["speedup"]) == set(llama3_layer.VARIANTS) - {"bf16"}
        base = entry["variants"]["bf16"]["wall_s"]
        for variant, speedup in derived["speedup"].items():
            assert speedup["wall"] == pytest.approx(base / entry["variants"][variant]["wall_s"])
            if on_cpu:
                assert speedup["cupti"] is None
        assert _positive(derived["xla_quant_over_kernel_quant"]["wall"])
        assert derived.get("goal") == llama3_layer.GOALS.get(name)
    returned, written = (r["phases"]["prefill"]["variants"]["bf16"] for r in (results, saved))
    assert returned["wall_s"] == written["wall_s"]


def test_smoke_run_prints_the_table_last(smoke, capsys):
    _, saved = smoke
    llama3_layer.print_table(saved)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "bf16" in line and "tensor-static" in line)
    assert all(variant in header for variant in llama3_layer.VARIANTS)
    for label in ("prefill     ms (wall)", "decode_b2   weight TB/s (wall)", "goal fp8 >= 1.7x bf16"):
        assert label in table


def test_xla_quant_override_is_active_when_traced(tmp_path):
    # A stand-in fused kernel with a per-token quantizer (the XLA formula, noting each trace) and no
    # GEMM: the xla-quant program must never trace it, channel-token's must.
    traced = []

    def per_token_quant(x, scale_ub, fp8_dtype):
        traced.append(x.shape)
        return quantization.quantize_per_token(x, scale_ub, fp8_dtype)

    def no_gemm(*args):
        raise AssertionError("the stand-in kernel takes no GEMM")

    kernel = platform.FusedKernel(
        scaled_mm=no_gemm,
        supports_device=lambda device: True,
        supports_shape=lambda k, n: False,
        per_token_quant=per_token_quant,
    )
    config = llama3_layer.SMOKE_CONFIG
    runs, traced_by = {}, {}
    for variant in ("channel-token-xla-quant", "channel-token"):
        argv = ["--smoke", "--variants", variant, "--phases", "decode_b1", "--reps", "1", "--calls", "1"]
        with platform.override(fused_kernel=kernel):
            saved = llama3_layer.main([*argv, "--out", str(tmp_path / f"{variant}.json")])
        assert not saved["errors"], saved["errors"]
        assert saved["fused_kernel"] == dict(registered=True, per_token_quant="per_token_quant")
        runs[variant] = saved["phases"]["decode_b1"]["variants"][variant]
        traced_by[variant], traced[:] = list(traced), []
    assert traced_by["channel-token-xla-quant"] == []
    # Traced once per distinct (input, weight) signature: decode rows, K of hidden or intermediate.
    assert set(traced_by["channel-token"]) == {(1, config.hidden_size), (1, config.intermediate_size)}

    kernel_run, xla_run = runs["channel-token"], runs["channel-token-xla-quant"]
    assert {p["quantizer"] for p in kernel_run["plans"]} == {dispatch.KERNEL_PER_TOKEN_QUANT}
    assert {p["quantizer"] for p in xla_run["plans"]} == {dispatch.XLA_QUANTIZERS["dynamic_per_token"]}
    assert [p["gemm"] for p in kernel_run["plans"]] == [p["gemm"] for p in xla_run["plans"]]
    assert all("no per-token quant kernel" in p["reason"] for p in xla_run["plans"])
    # The stand-in computes the XLA formula: the same layer output either way.
    assert kernel_run["output_std"] == xla_run["output_std"]


def test_speedups_on_a_hand_made_row():
    row = {
        "bf16": {"wall_s": 3.0, "cupti_s": 2.0},
        "channel-token": {"wall_s": 2.0, "cupti_s": 1.0},
        "channel-token-xla-quant": {"wall_s": 1.5, "cupti_s": None},
    }
    out = llama3_layer.derive(row, goal=1.7)
    assert out["speedup"] == {
        "channel-token": {"wall": 1.5, "cupti": 2.0},
        "channel-token-xla-quant": {"wall": 2.0, "cupti": None},
    }
    assert out["xla_quant_over_kernel_quant"] == {"wall": pytest.approx(4 / 3), "cupti": None}
    assert out["goal"] == 1.7 and out["meets_goal"] == {"channel-token": False, "channel-token-xla-quant": True}
    # Without bf16 there is nothing to compare against; without a goal none is judged.
    assert llama3_layer.derive({"channel-token": row["channel-token"]}, goal=None) == {"speedup": {}}


def test_kernel_buckets_of_hand_made_names():
    buckets = {
        "nvjet_sm90_tss_128x128_64x6_2x1_v_bz_NNT": "gemm",
        "nvjet_sm90_qqsss_128x128_128x6_2x1_v_bz_coopA_algo2_TNT": "gemm",
        "gemm_fusion_dot_452": "gemm",
        "cutlass3x_sm90_tensorop_s64x128x32gemm_e4m3_e4m3_f32": "gemm",
        "_gemm_kernel_mosaic_gpu_kernel": "gemm",
        "_quant_kernel_mosaic_gpu_kernel": "quant",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
        "input_reduce_fusion_65": "fusion",
        "loop_convert_fusion_59": "fusion",
        "loop_dynamic_update_slice_fusion_1": "fusion",
    }
    assert {name: llama3_layer.kernel_bucket(name) for name in buckets} == buckets
    timings = [("gemm_fusion_dot_1", 0.6), ("_quant_kernel_mosaic_gpu_kernel", 0.1), ("loop_add_fusion", 0.3)] * 2
    out = llama3_layer.bucket_seconds(timings, per=2)
    assert out["gemm"]["seconds"] == pytest.approx(0.6e-3) and out["gemm"]["share"] == pytest.approx(0.6)
    assert out["quant"]["seconds"] == pytest.approx(0.1e-3) and out["fusion"]["share"] == pytest.approx(0.3)
    assert out["attention"] == dict(seconds=0, share=0)


def test_full_size_settings_are_llama3_8b():
    config, phases = llama3_layer.LLAMA3_8B, llama3_layer.FULL.phases()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 8)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-5
    assert list(phases) == ["prefill", "decode_b1", "decode_b16", "decode_b64"]
    prefill = phases["prefill"]
    assert (prefill.batch, prefill.tokens, prefill.position, prefill.cache_length) == (1, 4096, 0, 4096)
    for batch in (1, 16, 64):
        decode = phases[f"decode_b{batch}"]
        assert (decode.batch, decode.tokens, decode.position, decode.cache_length) == (batch, 1, 2048, 2049)
    # What a decode layer reads: 2 bytes a bf16 weight, and the keys and values of every cached row.
    assert llama3_layer.kv_cache_bytes(config, phases["decode_b64"]) == 2 * 64 * 2049 * 8 * 128 * 2


def test_fused_projections_run_four_gemms_a_layer(tmp_path, smoke):
    """`--fused`: the fp8 layers are qkv, o, gate/up and down, and each layer's output is what the
    unfused layers computed (the same codes and scales, one GEMM where there were several)."""
    argv = ["--smoke", "--fused", "--variants", "channel-token", "--phases", "decode_b1", "--reps", "1"]
    saved = llama3_layer.main([*argv, "--calls", "1", "--out", str(tmp_path / "fused.json")])
    assert not saved["errors"], saved["errors"]
    assert saved["config"]["fused_projections"] is True
    run = saved["phases"]["decode_b1"]["variants"]["channel-token"]
    names = sorted(plan["path"].rsplit("/", 1)[1] for plan in run["plans"])
    layers = llama3_layer.SMOKE_CONFIG.num_hidden_layers
    assert names == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] * layers)
    unfused = smoke[1]["phases"]["decode_b1"]["variants"]["channel-token"]
    assert run["output_std"] == pytest.approx(unfused["output_std"], rel=1e-3)
