"""Our block-scaled fp8 checkpoints (DeepSeek-V3's layout) in transformers, and against our own layers.

Each case is a tiny float model quantized by `python -m w8a8_jax quantize --weights block
--block-size 32,32` in one `--format`:

- "fp8": `weight_scale_inv` with `"weight_block_size": [32, 32]`, read by transformers'
  FineGrainedFP8 loader. Its `FP8Linear` forward runs a GPU kernel (DeepGEMM or the Triton
  `finegrained-fp8` kernel of the `kernels` hub), which torch 2.13 on CPU cannot run, so on CPU
  transformers dequantizes every weight while loading (`dequantize=True`, what it falls back to by
  itself without a GPU) and runs float matmuls on unquantized activations. We test that path end
  to end, and load the `FP8Linear` modules too (`fp8_linear_modules_on_cpu`) to check the keys,
  codes and scales a GPU user gets, without running them. The dequantization infers the block from
  the scale grid's shape (`N // rows`, `K // cols`), right only where N and K are multiples of the
  block, so these models use whole blocks (ragged ones are tested with compressed-tensors, in
  test_llmcompressor_in_ours.py, and in tests/checkpoint).
- "compressed-tensors": `weight_scale` with compressed-tensors' block strategy (its FP8_BLOCK
  scheme), which compressed-tensors 0.19 decompresses on CPU and runs with its activations
  fake-quantized per token group (test_ours_in_transformers.py runs its generic checks too).

"Ours" is the float model with every fp8 layer computed by w8a8_jax (`dense.fp8_dense`, i.e.
`W8A8BlockFp8LinearOp`, in a worker process): its logits and each layer on the float inputs.
"""

import pytest
import torch

from interop import models, ours, torch_side
from interop.torch_side import bit_mismatch, cosine, fail_on, relative_error

FORMS = ("fp8", "compressed-tensors")
forms = pytest.mark.parametrize("form", FORMS)
BLOCK = [int(v) for v in ours.BLOCK_SIZE.split(",")]
# Ours quantizes activations per token group of 32. compressed-tensors fake-quantizes them with the
# same formula, so its layers match ours to float32 rounding (seen 2e-7); transformers' dequantized
# fp8 path does not quantize them, so its layers differ from ours by that error alone (seen 2-2.5 %,
# 3.3-3.8 % of both from the float layers). A doubled scale or a transposed weight is off by ~100 %.
LAYER_TOLERANCE = {"compressed-tensors": 1e-5, "fp8": 0.06}
FLOAT_LAYER_TOLERANCE = 0.06
COSINE_TO_OURS = {"compressed-tensors": 1 - 1e-6, "fp8": 0.999}
COSINE_TO_FLOAT = 0.99


def checkpoint(artifacts, form: str, model: str = "llama"):
    return artifacts.our_checkpoint(model, "block", "dynamic-group", form)


def dequantized(artifacts, form: str):
    """`(model, info, warnings)`: transformers' CPU load of our checkpoint, whose fp8 weights become
    float: the fp8 form asks for it (`dequantize=True`, else transformers warns that it falls back to
    it); compressed-tensors decompresses them on the first forward pass by itself."""
    spec = artifacts.float_model("llama").spec
    return torch_side.load(spec, checkpoint(artifacts, form), dequantize=form == "fp8", form=form)


@pytest.mark.parametrize("model", ["llama", "llama-tied"])
def test_fp8_form_is_what_transformers_reads(artifacts, model):
    """The fp8 form's config reads as FineGrainedFP8 with our block and our skip list, under the key
    transformers reads (`modules_to_not_convert`); vLLM's `ignored_layers` holds the same list."""
    from transformers import AutoConfig, FineGrainedFP8Config

    directory = checkpoint(artifacts, "fp8", model)
    written = AutoConfig.from_pretrained(directory).quantization_config
    read = FineGrainedFP8Config.from_dict(written)
    dump = artifacts.dump(directory)
    assert dump.config["form"] == "fp8" and dump.config["block_size"] == BLOCK
    assert list(read.weight_block_size) == BLOCK and read.activation_scheme == "dynamic" and read.scale_fmt == "float"
    assert read.modules_to_not_convert == written["ignored_layers"] == dump.config["ignore"]
    assert "lm_head" in dump.config["ignore"]


@pytest.mark.parametrize("model", ["llama", "llama-tied"])
def test_fp8_form_gpu_modules_keys_codes_and_scales(artifacts, model):
    """Loaded as on a GPU: exactly our fp8 layers become `FP8Linear` (a tied or ignored head stays a
    float Linear), no key is missing or unexpected, and each holds our codes and float32 block
    scales (`weight_scale_inv`) bit for bit, with our block."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    spec, directory = artifacts.float_model(model).spec, checkpoint(artifacts, "fp8", model)
    with torch_side.fp8_linear_modules_on_cpu():
        loaded, info, records = torch_side.load(spec, directory)
    assert not any(info.values()), f"loading info: {info}"
    fail_on(records, "warnings while loading")
    dump = artifacts.dump(directory)
    fp8_modules = {name for name, module in loaded.named_modules() if isinstance(module, FP8Linear)}
    assert fp8_modules == set(dump.layers), (sorted(fp8_modules ^ set(dump.layers)), dump.config["ignore"])
    assert type(loaded.lm_head) is torch.nn.Linear and loaded.lm_head.weight.dtype == spec.dtype
    mismatches = []
    for prefix in dump.layers:
        module = loaded.get_submodule(prefix)
        if list(module.block_size) != BLOCK:
            mismatches.append(f"{prefix}: block_size {module.block_size}")
        for what, mine, theirs in (
            ("fp8 codes", dump.codes(prefix), module.weight.detach()),
            ("weight_scale_inv", dump.get(prefix, "weight_scale"), module.weight_scale_inv.detach()),
        ):
            if problem := bit_mismatch(mine, theirs):
                mismatches.append(f"{prefix} {what}: {problem}")
    fail_on(mismatches, "FP8Linear modules differ from our checkpoint")


@forms
def test_dequantized_load_is_clean_and_bit_equal_to_ours(artifacts, form):
    """Loaded on CPU: no missing, unexpected or mismatched keys and no warnings; every fp8 layer's
    float weight is our dequantized weight (code times its block's scale, float32) bit for bit."""
    loaded, info, records = dequantized(artifacts, form)
    assert not any(info.values()), f"loading info: {info}"
    fail_on(records, "warnings while loading")
    dump = artifacts.dump(checkpoint(artifacts, form))
    modules = dict(loaded.named_modules())
    with torch.no_grad():
        loaded(input_ids=artifacts.float_model("llama").ids)  # compressed-tensors decompresses on the first pass
    mismatches = []
    for prefix in dump.layers:
        theirs = modules[prefix].weight.detach()
        if theirs.dtype != torch.float32:
            mismatches.append(f"{prefix}: transformers holds {theirs.dtype}, not the float32 weight")
        elif problem := bit_mismatch(dump.get(prefix, "weight"), theirs):
            mismatches.append(f"{prefix}: {problem}")
    fail_on(mismatches, f"transformers' dequantized weights ({form} form) differ from ours")


@forms
def test_logits_close_to_ours_and_to_float(artifacts, form):
    """transformers' logits on the eval ids against ours (the float model with our fp8 layers) and the float model's."""
    loaded, _, _ = dequantized(artifacts, form)
    float_model = artifacts.float_model("llama")
    theirs = models.output(loaded, float_model.ids)
    mine = artifacts.ours_run(checkpoint(artifacts, form), "llama").output
    to_ours, to_float, ours_to_float = (
        cosine(theirs, mine),
        cosine(theirs, float_model.output),
        cosine(mine, float_model.output),
    )
    print(f"{form}: cosine to ours {to_ours:.7f}, to float {to_float:.5f}; ours to float {ours_to_float:.5f}")
    assert to_ours > COSINE_TO_OURS[form] and min(to_float, ours_to_float) > COSINE_TO_FLOAT


@forms
def test_layer_outputs_close_to_ours(artifacts, form):
    """Each fp8 layer on the float model's inputs to it: transformers' output against our layer's, and
    both against the float layer's (fp8 W8A8 error)."""
    loaded, _, _ = dequantized(artifacts, form)
    float_model = artifacts.float_model("llama")
    run = artifacts.ours_run(checkpoint(artifacts, form), "llama")
    with torch.no_grad():
        loaded(input_ids=float_model.ids)  # compressed-tensors decompresses on the first pass
        theirs = {
            prefix: loaded.get_submodule(prefix)(float_model.layer_inputs[prefix]) for prefix in run.layer_outputs
        }
    problems = []
    for prefix, mine in run.layer_outputs.items():
        to_ours = relative_error(theirs[prefix], mine)
        to_float = max(relative_error(out, float_model.layer_outputs[prefix]) for out in (theirs[prefix], mine))
        if not (to_ours < LAYER_TOLERANCE[form] and to_float < FLOAT_LAYER_TOLERANCE):
            problems.append(f"{prefix}: relative error to ours {to_ours:.3g}, to float {to_float:.3g}")
    assert run.layer_outputs, "no fp8 layer"
    fail_on(problems, f"{form} form: transformers' layers against ours")
