"""The command line: quantize / inspect / report through `main([...])` and `python -m w8a8_jax`."""

import json
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests import reference
from tests.checkpoint.conftest import random_float, write_vllm_checkpoint
from w8a8_jax import checkpoint
from w8a8_jax.cli import main

LAYERS = {"model.layers.0.q_proj": (48, 32), "model.layers.0.down_proj": (32, 80), "lm_head": (17, 32)}


@pytest.fixture
def float_checkpoint(tmp_path, rng):
    """A float checkpoint: bf16, f16 and f32 linear weights, an embedding, a norm, a tokenizer file."""
    dtypes = [ml_dtypes.bfloat16, np.float16, np.float32]
    tensors = {f"{p}.weight": random_float(rng, shape).astype(d) for (p, shape), d in zip(LAYERS.items(), dtypes)}
    tensors["model.layers.0.q_proj.bias"] = random_float(rng, (48,)).astype(ml_dtypes.bfloat16)
    tensors["model.embed_tokens.weight"] = random_float(rng, (17, 32)).astype(ml_dtypes.bfloat16)
    tensors["model.norm.weight"] = random_float(rng, (32,))
    path = write_vllm_checkpoint(tmp_path / "float", tensors, None, {"architectures": ["Tiny"], "hidden_size": 32})
    (path / "tokenizer.json").write_text("{}")
    return path, tensors


def run(capsys, *argv):
    code = main([*argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_codes(weight, granularity):
    weight = np.asarray(weight, np.float32)
    return (
        reference.quant_dynamic_per_tensor(weight)
        if granularity == "per_tensor"
        else reference.quant_dynamic_per_token(weight)
    )


@pytest.mark.parametrize(
    "weights,activations,format,form",
    [("tensor", "dynamic", "fp8", "fp8"), ("tensor", "static", "fp8", "fp8"), ("tensor", "static", None, "compressed-tensors"),
     ("tensor", "dynamic", "auto", "fp8"), ("channel", "static", None, "compressed-tensors"),
     ("channel", "dynamic-token", "auto", "compressed-tensors"), ("tensor", "dynamic-token", None, "compressed-tensors")],
)  # fmt: skip
def test_quantize_inspect_report(tmp_path, rng, capsys, float_checkpoint, weights, activations, format, form):
    path, tensors = float_checkpoint
    calibration = {p: random_float(rng, (9, shape[1])) * 3 for p, shape in LAYERS.items()}
    save_file(calibration, str(tmp_path / "inputs.safetensors"))
    out_dir = tmp_path / "fp8"
    format_args = [] if format is None else ["--format", format]
    code, out, err = run(capsys, "quantize", str(path), str(out_dir), "--weights", weights, "--activations", activations,
                         "--calibrate", str(tmp_path / "inputs.safetensors"), *format_args)  # fmt: skip
    assert code == 0, err
    assert "quantize: 100%" in err and "6/6" in err  # the per-tensor progress bar
    assert (
        "2 layers quantized" in out and f"'{form}' quantization_config" in out and "lm_head" not in out.split("\n\n")[0]
    )
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["Tiny"] and config["quantization_config"]["quant_method"] == form
    fp8 = checkpoint.SafetensorsCheckpoint(out_dir)
    qconfig = checkpoint.read_quantization_config(fp8)
    assert qconfig.ignore == ("lm_head",)
    layers = {layer.prefix: layer for layer in checkpoint.read_fp8_layers(fp8)}
    assert sorted(layers) == ["model.layers.0.down_proj", "model.layers.0.q_proj"]
    for prefix, layer in layers.items():
        codes, scale = expected_codes(tensors[f"{prefix}.weight"], qconfig.weight_granularity)
        np.testing.assert_array_equal(layer.weight.view(np.uint8), codes.view(np.uint8))
        np.testing.assert_array_equal(layer.weight_scale, scale)
        if activations == "static":
            amax = np.float32(np.abs(calibration[prefix]).max())
            np.testing.assert_array_equal(layer.input_scale, [amax / np.float32(448.0)])
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.q_proj.bias"):
        assert fp8.tensor(name).tobytes() == tensors[name].tobytes() and fp8.tensor(name).dtype == tensors[name].dtype

    code, out, err = run(capsys, "inspect", str(out_dir))
    assert code == 0, err
    assert "model.layers.0.down_proj  32x80" in out and "2 fp8 layers, 1 left float" in out and "saved" in out

    code, out, err = run(capsys, "report", str(path), str(out_dir), "--inputs", str(tmp_path / "inputs.safetensors"))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers")]
    assert len(rows) == 2 and all(len(row) == 7 for row in rows)
    weight_sqnr, output_sqnr = float(rows[0][2]), float(rows[0][5])
    # e4m3 has 3 mantissa bits: about 30 dB for weights of uniform magnitude, a little less on outputs.
    assert 25 < weight_sqnr < 40 and 20 < output_sqnr < 40


def test_include_exclude_and_shards(tmp_path, capsys, float_checkpoint):
    path, _ = float_checkpoint
    code, out, err = run(capsys, "quantize", str(path), str(tmp_path / "o"), "--include", "q_proj|lm_head",
                         "--no-default-exclude", "--max-shard-size", "3KiB", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "quantize:" not in err  # --no-progress
    fp8 = checkpoint.SafetensorsCheckpoint(tmp_path / "o")
    assert checkpoint.fp8_layer_prefixes(fp8) == ["lm_head", "model.layers.0.q_proj"] and len(fp8.files) > 1
    assert checkpoint.read_quantization_config(fp8).ignore == ("model.layers.0.down_proj",)  # embeddings are not layers
    code, out, err = run(capsys, "inspect", str(path))
    assert (
        code == 0
        and "float checkpoint" in out
        and "2 linear weights `quantize` would convert by default, 2 it leaves float" in out
    )


@pytest.mark.parametrize(
    "argv,match",
    [
        (["quantize", "{float}", "{tmp}/o", "--activations", "static"], "static activations need calibration inputs"),
        (["quantize", "{tmp}/missing", "{tmp}/o"], "no checkpoint at"),
        (["quantize", "{float}", "{tmp}/float"], "holds the input checkpoint"),
        (["quantize", "{float}", "{tmp}", "--overwrite"], "holds the input checkpoint"),
        (["quantize", "{float}/model.safetensors", "{float}", "--overwrite"], "holds the input checkpoint"),
        (["quantize", "{float}", "{tmp}/corrupt"], "exists and is not empty"),
        (["quantize", "{float}", "{tmp}/o", "--include", "nothing-matches"], "no float 2-D"),
        (["inspect", "{tmp}/corrupt"], "not a valid safetensors file"),
        (["report", "{float}", "{float}"], "no quantization_config"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, float_checkpoint, argv, match):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x20" * 40)
    argv = [a.format(float=float_checkpoint[0], tmp=tmp_path) for a in argv]
    code, _, err = run(capsys, *argv, *(["--no-progress"] if argv[0] != "report" else []))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"w8a8-jax {argv[0]}: error: ") and match in lines[0], err
    assert not (tmp_path / "o").exists()


def test_quantizing_an_fp8_checkpoint_is_refused(tmp_path, capsys, float_checkpoint):
    assert main(["quantize", str(float_checkpoint[0]), str(tmp_path / "fp8"), "--no-progress"]) == 0
    code, _, err = run(capsys, "quantize", str(tmp_path / "fp8"), str(tmp_path / "again"))
    assert code == 1 and "already quantized" in err


def test_python_dash_m(tmp_path, float_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "w8a8_jax", "inspect", str(float_checkpoint[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "float checkpoint" in result.stdout, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "w8a8_jax", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        result.returncode == 1
        and result.stderr.strip() == f"w8a8-jax inspect: error: no checkpoint at {tmp_path / 'nope'}"
    )


def test_report_on_a_checkpoint_without_fp8_layers(tmp_path, capsys, float_checkpoint):
    path, tensors = float_checkpoint
    quant_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    no_fp8 = write_vllm_checkpoint(tmp_path / "no_fp8", {"lm_head.weight": tensors["lm_head.weight"]}, quant_config)
    code, out, err = run(capsys, "report", str(path), str(no_fp8), "--no-progress")
    assert code == 1 and out == ""
    assert err.strip() == f"w8a8-jax report: error: {no_fp8} holds no fp8 layers to report on"


def test_report_inputs_with_the_wrong_features_name_the_layer(tmp_path, rng, capsys, float_checkpoint):
    path, _ = float_checkpoint
    assert main(["quantize", str(path), str(tmp_path / "fp8"), "--no-progress"]) == 0
    capsys.readouterr()
    save_file({"model.layers.0.down_proj": random_float(rng, (5, 33))}, str(tmp_path / "inputs.safetensors"))
    code, _, err = run(capsys, "report", str(path), str(tmp_path / "fp8"), "--inputs", str(tmp_path / "inputs.safetensors"), "--no-progress")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert "inputs for 'model.layers.0.down_proj' have shape (5, 33)" in lines[0] and "needs (..., 80)" in lines[0]


def test_every_linear_left_float_is_ignored(tmp_path, rng, capsys):
    """A tied LM head (no `lm_head.weight` in the file) and a float64 weight: `lm_head` is listed in
    `ignore` (a loader would otherwise quantize it and look for its scales); the float64 weight is
    quantized like any other."""
    tensors = {
        "model.layers.0.q_proj.weight": random_float(rng, (16, 32)),
        "model.layers.0.o_proj.weight": random_float(rng, (32, 16)).astype(np.float64),
        "model.embed_tokens.weight": random_float(rng, (11, 32)),
    }
    path = write_vllm_checkpoint(tmp_path / "tied", tensors, None, {"tie_word_embeddings": True})
    code, out, err = run(capsys, "quantize", str(path), str(tmp_path / "fp8"), "--no-progress")
    assert code == 0, err
    fp8 = checkpoint.SafetensorsCheckpoint(tmp_path / "fp8")
    config = checkpoint.read_quantization_config(fp8)
    assert config.ignore == ("lm_head",)
    assert checkpoint.fp8_layer_prefixes(fp8) == ["model.layers.0.o_proj", "model.layers.0.q_proj"]
    assert sorted(config.targets) == checkpoint.fp8_layer_prefixes(fp8)  # no tied module is taken for fp8
    codes, scale = expected_codes(tensors["model.layers.0.o_proj.weight"].astype(np.float32), "per_channel")
    reference.assert_bit_identical(fp8.tensor("model.layers.0.o_proj.weight"), codes)
    reference.assert_bit_identical(fp8.tensor("model.layers.0.o_proj.weight_scale"), scale)
    code, out, err = run(capsys, "inspect", str(tmp_path / "fp8"), "--no-progress")
    assert "2 fp8 layers, 1 left float" in out


def test_exclude_adds_to_the_defaults(tmp_path, capsys, float_checkpoint):
    path, _ = float_checkpoint
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "o"), "--exclude", "down_proj", "--no-progress")
    assert code == 0, err
    fp8 = checkpoint.SafetensorsCheckpoint(tmp_path / "o")
    assert checkpoint.fp8_layer_prefixes(fp8) == ["model.layers.0.q_proj"]  # embeddings and lm_head stay float
    assert checkpoint.read_quantization_config(fp8).ignore == ("lm_head", "model.layers.0.down_proj")
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "all"), "--no-default-exclude",
                       "--exclude", "embed", "--exclude", "norm", "--no-progress")  # fmt: skip
    assert code == 0, err
    fp8 = checkpoint.SafetensorsCheckpoint(tmp_path / "all")
    assert checkpoint.fp8_layer_prefixes(fp8) == ["lm_head", "model.layers.0.down_proj", "model.layers.0.q_proj"]
    assert checkpoint.read_quantization_config(fp8).ignore == ()


@pytest.mark.parametrize(
    "inputs, match",
    [
        (np.float32(3.0), r"calibration inputs for 'model.layers.0.q_proj' must be \(..., 32\)"),
        (np.zeros((0, 32), np.float32), r"must be \(..., 32\) with at least one row"),
        ("nan", r"calibration inputs for 'model.layers.0.q_proj' holds 1 NaN or Inf value; calibration data must"),
    ],
)
def test_bad_calibration_inputs_are_one_line(tmp_path, rng, capsys, float_checkpoint, inputs, match):
    path, _ = float_checkpoint
    calibration = {p: random_float(rng, (9, shape[1])) for p, shape in LAYERS.items()}
    if isinstance(inputs, str):
        calibration["model.layers.0.q_proj"][4, 2] = np.nan
    else:
        calibration["model.layers.0.q_proj"] = np.asarray(inputs)
    save_file(calibration, str(tmp_path / "inputs.safetensors"))
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "o"), "--activations", "static",
                       "--calibrate", str(tmp_path / "inputs.safetensors"), "--no-progress")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and re.search(match, lines[0]), err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_is_one_line(tmp_path, rng, capsys, bad):
    weight = random_float(rng, (16, 32))
    weight[3, 3] = bad
    path = write_vllm_checkpoint(tmp_path / "bad", {"layer.weight": weight}, None)
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "o"), "--no-progress")
    assert code == 1 and "layer.weight holds 1 NaN or Inf value; it cannot be quantized" in err


def test_help_says_which_consumer_reads_which_form(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "compressed-tensors (default; vLLM, transformers and llm-compressor read it)" in out
    assert "transformers misreads it" in out and "--no-default-exclude" in out
    assert "weight_scale_inv, which vLLM and transformers read" in out and "--block-size BN,BK" in out


# ----------------------------------------------------------------------------------------------
# Block weights


@pytest.mark.parametrize(
    "options,form,block",
    [
        (["--block-size", "16,32", "--format", "fp8"], "fp8", (16, 32)),
        (["--block-size", "16x32"], "compressed-tensors", (16, 32)),
        (["--block-size", "32,16", "--format", "auto", "--activations", "dynamic-group"], "fp8", (32, 16)),
        ([], "compressed-tensors", (128, 128)),
    ],
    ids=["fp8", "compressed-tensors", "auto", "default-block"],
)  # fmt: skip
def test_quantize_inspect_report_block(tmp_path, rng, capsys, float_checkpoint, options, form, block):
    """`--weights block`: the reference's block codes and F32 scales under the form's name (ragged
    last blocks: 48 = 3 x 16, 80 = 2.5 x 32), then inspect's block statistics and report's errors."""
    path, tensors = float_checkpoint
    out_dir = tmp_path / "fp8"
    code, out, err = run(capsys, "quantize", str(path), str(out_dir), "--weights", "block", *options, "--no-progress")
    assert code == 0, err
    # 80 columns end inside a 32-wide block (48 rows inside a 32-high one): only the fp8 form's
    # consumer that cannot read that (transformers' dequantizing loader) is worth a note.
    assert ("have N or K not a multiple of the" in err) == (form == "fp8"), err
    summary = out.split("\n\n")[1]
    assert (
        f"2 layers quantized (block {block[0]}x{block[1]} weights, dynamic_per_token_group activations, '{form}'"
        in summary
    )
    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == form
    fp8 = checkpoint.SafetensorsCheckpoint(out_dir)
    qconfig = checkpoint.read_quantization_config(fp8)
    assert qconfig.block_size == block and qconfig.ignore == ("lm_head",)
    scale_leaf = "weight_scale_inv" if form == "fp8" else "weight_scale"
    expected_scales = {}
    for prefix in ("model.layers.0.q_proj", "model.layers.0.down_proj"):
        codes, scale = reference.quant_block_weight(np.asarray(tensors[f"{prefix}.weight"], np.float32), block)
        assert fp8.dtype_name(f"{prefix}.{scale_leaf}") == "F32" and f"{prefix}.input_scale" not in fp8
        reference.assert_bit_identical(fp8.tensor(f"{prefix}.weight"), codes)
        reference.assert_bit_identical(fp8.tensor(f"{prefix}.{scale_leaf}"), scale)
        expected_scales[prefix] = scale

    code, out, err = run(capsys, "inspect", str(out_dir), "--no-progress")
    assert code == 0, err
    down = expected_scales["model.layers.0.down_proj"]
    row = next(line for line in out.splitlines() if line.startswith("model.layers.0.down_proj"))
    assert row.split()[:4] == ["model.layers.0.down_proj", "32x80", "F8_E4M3", "x".join(map(str, down.shape))]
    stats = f"{down.size} blocks: {down.min():.3g}/{float(np.median(down)):.3g}/{down.max():.3g}"
    assert stats in row, row
    blocks = sum(scale.size for scale in expected_scales.values())
    assert f"'{form}' quantization_config: block {block[0]}x{block[1]} weights ({blocks} blocks in all)" in out
    assert f"{scale_leaf} (blocks: min/median/max)" in out and "2 fp8 layers, 1 left float" in out

    inputs = {p: random_float(rng, (9, shape[1])) * 3 for p, shape in LAYERS.items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    code, out, err = run(capsys, "report", str(path), str(out_dir), "--inputs", str(tmp_path / "inputs.safetensors"), "--no-progress")  # fmt: skip
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers")]
    assert len(rows) == 2 and all(len(row) == 7 for row in rows)
    # e4m3: about 30 dB for weights of uniform magnitude, a little less on outputs.
    assert all(25 < float(row[2]) < 40 and 20 < float(row[5]) < 40 for row in rows), rows
    assert f"2 layers (block {block[0]}x{block[1]} weights, dynamic_per_token_group)" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--weights", "block", "--block-size", "128"], "--block-size must be two ints >= 1 as BN,BK (e.g. 128,128), got '128'"),
        (["--weights", "block", "--block-size", "0,128"], "--block-size must be two ints >= 1 as BN,BK"),
        (["--weights", "block", "--block-size", "a,b"], "--block-size must be two ints >= 1 as BN,BK"),
        (["--weights", "block", "--block-size", "1.5,2"], "--block-size must be two ints >= 1 as BN,BK"),
        (["--weights", "channel", "--block-size", "128,128"], "--block-size applies only to --weights block"),
        (["--weights", "block", "--activations", "static"], "--weights block quantizes activations per token group"),
        (["--weights", "block", "--activations", "dynamic"], "use --activations dynamic-group"),
        (["--activations", "dynamic-group"], "activation_scheme='dynamic_per_token_group' goes with block weights"),
    ],
)  # fmt: skip
def test_block_options_errors_are_one_line(tmp_path, capsys, float_checkpoint, argv, match):
    code, _, err = run(capsys, "quantize", str(float_checkpoint[0]), str(tmp_path / "o"), *argv, "--no-progress")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("w8a8-jax quantize: error: ") and match in lines[0], (
        err
    )
    assert not (tmp_path / "o").exists()


def test_inspect_and_report_on_a_hand_made_block_checkpoint(tmp_path, rng, capsys):
    """A DeepSeek-style checkpoint nobody here wrote (N = 576, K = 320: ragged blocks) inspects and
    reports against its float weights."""
    from tests.checkpoint.conftest import FP8_FORM_BLOCK, block_layer

    tensors = block_layer(rng, "model.layers.0.self_attn.kv_a_proj_with_mqa", 576, 320, scale_name="weight_scale_inv")
    fp8_dir = write_vllm_checkpoint(tmp_path / "fp8", tensors, FP8_FORM_BLOCK)
    codes = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    scale = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    dequantized = reference.dequantize_blocks(codes, scale, (128, 128))
    noise = 1 + rng.uniform(-0.01, 0.01, dequantized.shape)  # the float weights the codes came from, near enough
    float_dir = write_vllm_checkpoint(
        tmp_path / "float", {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (dequantized * noise).astype(np.float32)}, None
    )  # fmt: skip
    code, out, err = run(capsys, "inspect", str(fp8_dir), "--no-progress")
    assert code == 0, err
    assert "576x320" in out and "5x3" in out and "15 blocks:" in out and "(15 blocks in all)" in out
    code, out, err = run(capsys, "report", str(float_dir), str(fp8_dir), "--no-progress")
    assert code == 0, err
    (row,) = [line.split() for line in out.splitlines() if line.startswith("model.layers")]
    # The dequantized weights are the float ones to 1 %: 40 dB, where a wrong block scale gives < 0 dB.
    assert 35 < float(row[2]) < 50, row
