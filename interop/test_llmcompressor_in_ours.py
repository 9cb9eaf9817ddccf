"""llm-compressor's FP8 checkpoints read by `w8a8_jax.checkpoint`.

Each case is a tiny Llama quantized by `oneshot` with `QuantizationModifier(targets="Linear",
scheme=..., ignore=["lm_head"])` (`torch_side.llmcompressor_recipe`) and saved compressed;
llm-compressor writes the scales in the model's dtype. What we read (jax_side.py's dump) is
compared with the raw safetensors (torch) and with compressed-tensors' own decompression
(transformers with `dequantize=True`). The block cases: the FP8_BLOCK preset (128x128 blocks, one
partial block per layer of these 32..128-wide models) in bf16, and 48x32 blocks, partial ones
included (64 = 48 + 16 rows), in float32.
"""

import pytest
import torch
from safetensors.torch import load_file

from interop import ours, torch_side
from interop.torch_side import bit_mismatch, fail_on

# scheme -> (our weight granularity, our activation scheme, our block size)
SCHEMES = {
    "FP8_DYNAMIC": ("per_channel", "dynamic_per_token", None),
    "FP8": ("per_tensor", "static", None),
    "FP8_BLOCK": ("block", "dynamic_per_token_group", [128, 128]),
    "FP8_BLOCK_48x32": ("block", "dynamic_per_token_group", [48, 32]),
}
CASES = [(model, scheme) for model in ("llama", "llama-bf16") for scheme in ("FP8_DYNAMIC", "FP8")]
CASES += [("llama-bf16", "FP8_BLOCK"), ("llama", "FP8_BLOCK_48x32")]
cases = pytest.mark.parametrize("model,scheme", CASES, ids=[f"{m}-{s}" for m, s in CASES])


def checkpoint(artifacts, model, scheme):
    return artifacts.llmcompressor(model, scheme)


def raw(artifacts, model, scheme) -> dict[str, torch.Tensor]:
    return load_file(checkpoint(artifacts, model, scheme) / "model.safetensors")


@cases
def test_we_read_the_scheme_and_layers(artifacts, model, scheme):
    """Our config is llm-compressor's scheme; our fp8 layers are the Linears it quantized (all but lm_head)."""
    dump = artifacts.dump(checkpoint(artifacts, model, scheme))
    granularity, activations, block_size = SCHEMES[scheme]
    assert dump.config == {
        "form": "compressed-tensors",
        "weight_granularity": granularity,
        "activation_scheme": activations,
        "block_size": block_size,
        "ignore": ["lm_head"],
    }
    tensors = raw(artifacts, model, scheme)
    fp8_in_file = sorted(name.removesuffix(".weight") for name, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    float_model = artifacts.float_model(model).model
    linears = sorted(n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert dump.layers == fp8_in_file == linears


@cases
def test_codes_and_scales_upcast_exactly(artifacts, model, scheme):
    """Our fp8 codes are the file's; our float32 scales are the file's (model-dtype) scales upcast exactly."""
    dump, tensors = artifacts.dump(checkpoint(artifacts, model, scheme)), raw(artifacts, model, scheme)
    dtype = artifacts.float_model(model).spec.dtype
    mismatches = []
    for prefix in dump.layers:
        for leaf in ("weight_scale", "input_scale"):
            stored = tensors.get(f"{prefix}.{leaf}")
            if stored is not None and stored.dtype != dtype:
                mismatches.append(f"{prefix}.{leaf}: llm-compressor wrote {stored.dtype}, the model is {dtype}")
        checks = {"fp8 codes": (dump.codes(prefix), tensors[f"{prefix}.weight"])}
        checks["weight_scale"] = (dump.get(prefix, "weight_scale"), tensors[f"{prefix}.weight_scale"].float())
        if scheme == "FP8":
            checks["input_scale"] = (dump.get(prefix, "input_scale"), tensors[f"{prefix}.input_scale"].float())
        elif dump.get(prefix, "input_scale") is not None:
            mismatches.append(f"{prefix}: we read an input_scale for dynamic activations")
        for what, (mine, theirs) in checks.items():
            if mine is None:
                mismatches.append(f"{prefix} {what}: missing in our reading")
            elif problem := bit_mismatch(mine, theirs):
                mismatches.append(f"{prefix} {what}: {problem}")
    fail_on(mismatches, "our reading differs from the file")


@cases
def test_dequantized_weights_bit_equal(artifacts, model, scheme):
    """Our dequantized weights (float32) are `codes.float() * scale.float()` of the file (each code by
    its block's scale for block weights), bit for bit, and rounded to the model's dtype they are what
    compressed-tensors decompresses."""
    directory = checkpoint(artifacts, model, scheme)
    dump, tensors = artifacts.dump(directory), raw(artifacts, model, scheme)
    spec = artifacts.float_model(model).spec
    decompressed, info, _ = torch_side.load(spec, directory, dequantize=True)
    assert not any(info.values()), f"transformers loading info: {info}"
    modules = dict(decompressed.named_modules())
    mismatches = []
    for prefix in dump.layers:
        codes, scale = tensors[f"{prefix}.weight"].float(), tensors[f"{prefix}.weight_scale"].float()
        block_size = SCHEMES[scheme][2]
        if block_size is not None:
            scale = torch_side.expand_block_scale(scale, tuple(codes.shape), tuple(block_size))
        exact = codes * scale
        theirs = modules[prefix].weight.detach()
        for what, mine, expected in (
            ("vs the file's codes * scale in float32", dump.get(prefix, "weight"), exact),
            (
                f"vs compressed-tensors' decompression ({theirs.dtype})",
                dump.get(prefix, "weight").to(theirs.dtype),
                theirs,
            ),
        ):
            if problem := bit_mismatch(mine, expected):
                mismatches.append(f"{prefix} {what}: {problem}")
    fail_on(mismatches, "our dequantized weights differ")


@cases
def test_inspect_reads_it(artifacts, model, scheme):
    """`python -m w8a8_jax inspect` reads the checkpoint."""
    result = ours.inspect(artifacts.python, checkpoint(artifacts, model, scheme))
    float_model = artifacts.float_model(model).model
    layers = sum(isinstance(m, torch.nn.Linear) for n, m in float_model.named_modules() if n != "lm_head")
    assert f"{layers} fp8 layers" in result.stdout, result.stdout
