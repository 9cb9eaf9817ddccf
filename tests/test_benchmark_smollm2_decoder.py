"""The SmolLM2 decoder benchmark on CPU: its main path with `--smoke` (a 2-layer model, every variant,
no CUPTI) into a JSON file whose structure and figures are checked, and its full-size settings."""

import json
import math
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import smollm2_decoder  # noqa: E402
import timing  # noqa: E402

from w8a8_jax.models import generate, schemes  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _buckets_hit(lengths, cache_length) -> set[int]:
    buckets = [b for b in generate.DEFAULT_BUCKETS if b <= cache_length]
    return {min(b for b in buckets if b >= length) for length in lengths}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.json"
    results = smollm2_decoder.main(["--smoke", "--reps", "2", "--cupti-reps", "1", "--out", str(path)])
    return results, json.loads(path.read_text())


def test_smoke_run_records_every_variant_and_phase(smoke, capsys):
    results, saved = smoke
    sizes, config = smollm2_decoder.SMOKE, smollm2_decoder.SMOKE_CONFIG
    assert saved["variants"].keys() == {"bf16", *schemes.SCHEMES}
    assert not saved["errors"] and not saved["skipped"], (saved["errors"], saved["skipped"])
    assert saved["device"] == jax.devices()[0].device_kind and saved["jax"] == jax.__version__
    assert "--smoke" in saved["command"] and saved["config"]["smoke"] is True
    assert saved["config"]["sizes"]["batches"] == list(sizes.batches)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        assert "not supported" in saved["cupti"]
    layers = 7 * config.num_hidden_layers
    bf16_bytes = saved["variants"]["bf16"]["weights"]["total_bytes"]

    for variant, result in saved["variants"].items():
        prefill = result["prefill"]
        assert prefill["tokens"] == sizes.prefill_tokens and prefill["bucket"] == sizes.prefill_tokens
        assert _positive(prefill["wall_s"]) and len(prefill["wall_samples_s"]) == 2
        assert prefill["tokens_per_s"] == pytest.approx(sizes.prefill_tokens / prefill["wall_s"])
        assert prefill["logits_finite"] is True and _positive(prefill["logits_std"])
        if on_cpu:
            assert prefill["cupti_s"] is None and prefill["cupti_kernels"] is None

        assert set(result["decode"]) == {str(b) for b in sizes.batches}
        for batch in sizes.batches:
            step = result["decode"][str(batch)]
            assert step["batch"] == batch and step["steps"] == sizes.decode_steps
            assert step["positions"] == [sizes.context, sizes.context + sizes.decode_steps - 1]
            assert _positive(step["step_s"]) and step["ms_per_step"] == pytest.approx(1e3 * step["step_s"])
            assert step["tokens_per_s"] == pytest.approx(batch / step["step_s"])
            assert _positive(step["weight_gbps"]) and step["logits_finite"] is True
            assert _positive(step["jit_step_s"]) and 0 < step["enqueue_step_s"] <= step["step_s"]
            assert step["kv_cache_bytes"] == smollm2_decoder.kv_cache_bytes(config, batch, sizes.cache_length)
            if on_cpu:
                assert step["cupti_step_s"] is None and step["cupti_weight_gbps"] is None

        weights = result["weights"]
        assert weights["linear_layers"] == layers
        assert weights["total_bytes"] == weights["linear_bytes"] + weights["head_bytes"]
        assert weights["head_bytes"] == 2 * config.vocab_size * config.hidden_size  # the bf16 tied embedding
        if variant != "bf16":  # one byte a weight and its scales, against two
            assert weights["total_bytes"] < bf16_bytes
            assert {p["m"] for p in result["plans"]} == {*sizes.batches, sizes.prefill_tokens}
            assert all(p.get("gemm") for p in result["plans"]), result["plans"]

        split = result["split"]
        assert split["batch"] == sizes.batches[0] and split["layers"] == layers
        for name in ("linears_wall_s", "head_wall_s", "gemm_share_wall", "head_share_wall"):
            assert _positive(split[name]), (variant, name, split[name])
        assert split["gemm_share_wall"] == pytest.approx(split["linears_wall_s"] / split["decode_step_wall_s"])

        # The compile loop ran first on the variant's fresh generator; what it compiled was reused.
        loop = result["compile_loop"]
        assert loop["complete"] is True and loop["lengths"] == list(sizes.compile_lengths)
        hit = _buckets_hit(sizes.compile_lengths, sizes.cache_length)
        assert len(hit) > 1 and loop["buckets_hit"] == sorted(hit)
        assert loop["prefill_compiles"] == len(hit) and loop["decode_compiles"] == 1
        assert _positive(loop["total_s"]) and loop["total_s"] >= sum(loop["per_length_s"])

    for variant in schemes.SCHEMES:
        assert set(saved["ratios"][variant]) >= {"prefill ms (wall)", "decode b1 ms/step (wall)"}
        assert all(_positive(r) for r in saved["ratios"][variant].values())
    assert results["variants"]["bf16"]["prefill"]["wall_s"] == saved["variants"]["bf16"]["prefill"]["wall_s"]


def test_smoke_run_prints_the_table_last(smoke, capsys):
    # The table went out while the fixture ran; print it again from the saved figures.
    _, saved = smoke
    smollm2_decoder.print_table(saved, smollm2_decoder.SMOKE)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if "bf16" in line and "block" in line)
    assert all(variant in header for variant in ("bf16", *schemes.SCHEMES))
    for label in ("prefill ms (wall)", "decode b2 tokens/s", "GEMM share (wall)", "prefill compiles"):
        assert label in table


def test_full_size_settings_are_smollm2_135m():
    config, sizes = smollm2_decoder.SMOLLM2_135M, smollm2_decoder.FULL
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        49152,
        576,
        1536,
        30,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_theta == 1e5 and config.rms_norm_eps == 1e-5 and config.tie_word_embeddings
    assert (sizes.prefill_tokens, sizes.cache_length, sizes.batches, sizes.decode_steps) == (
        2048,
        4096,
        (1, 16, 64),
        50,
    )
    assert len(sizes.compile_lengths) == 20 and min(sizes.compile_lengths) == 5 and max(sizes.compile_lengths) == 2000
    assert len(_buckets_hit(sizes.compile_lengths, sizes.cache_length)) == 8  # 16 .. 2048
    assert max(sizes.compile_lengths) + sizes.compile_new_tokens <= sizes.cache_length


def test_cupti_runs_the_call_as_it_is():
    # profiler.measure jits anything that is not a jax.stages.Wrapped; AsIs must pass that check so
    # the wall clock and CUPTI time the same Python call (several jitted calls and eager ops).
    calls = []
    wrapped = timing.AsIs(lambda: calls.append(1) or 3)
    assert isinstance(wrapped, jax.stages.Wrapped)
    assert wrapped() == 3 and calls == [1]
    state = {"error": None}
    if jax.default_backend() == "cpu":
        assert timing.cupti_profile(wrapped, 2, state) is None and "not supported" in state["error"]


def test_kernel_breakdown_is_per_step_and_ranked():
    # What CUPTI's per-kernel list (name, ms) of a 2-step loop becomes (the GPU-only path's arithmetic).
    timings = [("gemm", 0.3), ("softmax", 0.1), ("gemm", 0.3), ("softmax", 0.1), ("copy", 0.2)]
    out = timing.breakdown(timings, per=2, top=2)
    assert out["launches"] == 2.5 and out["distinct"] == 3
    assert out["seconds"] == pytest.approx(0.5e-3)
    assert [k["name"] for k in out["top"]] == ["gemm", "softmax"]
    assert out["top"][0]["seconds"] == pytest.approx(0.3e-3) and out["top"][0]["launches"] == 1
    assert out["top"][0]["share"] == pytest.approx(0.6)


def test_tasks_run_in_order_and_by_phase():
    sizes, variants = smollm2_decoder.FULL, ("bf16", "block")
    names = [(phase, variant) for phase, variant, _, _ in smollm2_decoder.tasks(sizes, variants)]
    per_variant = ["compile_loop", "prefill", "decode_b1"]
    assert names == [(p, v) for v in variants for p in per_variant] + [
        (p, v) for p in ("linears", "decode_b16", "decode_b64") for v in variants
    ]
    decode = smollm2_decoder.tasks(sizes, variants, ["decode"])
    assert [(p, v, where) for p, v, where, _ in decode] == [
        (f"decode_b{b}", v, ("decode", str(b))) for b in sizes.batches for v in variants
    ]
    assert [p for p, *_ in smollm2_decoder.tasks(sizes, variants, ["compile_loop"])] == ["compile_loop"] * 2


def test_fused_run_fuses_where_the_scheme_allows(tmp_path):
    argv = ["--smoke", "--fused", "--variants", "bf16", "block", "--phases", "linears", "--reps", "1"]
    saved = smollm2_decoder.main([*argv, "--cupti-reps", "1", "--out", str(tmp_path / "fused.json")])
    assert not saved["errors"], saved["errors"]
    assert saved["config"]["fused_projections"] is True
    assert saved["variants"]["bf16"]["not_fused"] is None
    assert "fused block fp8 shards must be multiples" in saved["variants"]["block"]["not_fused"]
