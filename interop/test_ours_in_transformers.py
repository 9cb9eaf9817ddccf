"""Our command line's checkpoints (compressed-tensors form) loaded by transformers + compressed-tensors.

Each case is a tiny float model quantized by `python -m w8a8_jax quantize` in one scheme and loaded
with `from_pretrained` as a user does; transformers decompresses the fp8 weights on the first
forward pass (`weight.to(scale.dtype) * weight_scale`) and fake-quantizes the activations.
"""

import dataclasses

import pytest
import torch

from interop import torch_side
from interop.torch_side import bit_mismatch, cosine, fail_on, relative_error

SCHEMES = [(w, a) for w in ("tensor", "channel") for a in ("static", "dynamic", "dynamic-token")]
# fp8 e4m3 W8A8 costs these layers 3.5-5 % relative error on unseen inputs; a doubled scale costs 100 %
# and a transposed weight ~140 % (test_layer_check_catches_a_wrong_scale_or_a_transpose).
LAYER_TOLERANCE = 0.1
COSINE = 0.99


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    weights: str
    activations: str
    load_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        suffix = "" if self.load_dtype is None else f"-as-{str(self.load_dtype).removeprefix('torch.')}"
        return f"{self.model}-{self.weights}-{self.activations}{suffix}"


CASES = [
    *(Case(model, w, a) for model in ("llama", "llama-tied", "bert") for w, a in SCHEMES),
    Case("llama-bf16", "channel", "dynamic-token"),
    Case("llama-bf16", "tensor", "static"),
    Case("llama-bf16", "channel", "dynamic-token", torch.float32),
    Case("bert-mlm", "channel", "dynamic-token"),
    # Block weights (compressed-tensors' block strategy, `ours.BLOCK_SIZE` blocks) with activations
    # quantized per token group; test_block_fp8_in_transformers.py has the fp8 form and ours.
    Case("llama", "block", "dynamic-group"),
]
cases = pytest.mark.parametrize("case", CASES, ids=str)


def loaded(artifacts, case: Case):
    return artifacts.in_transformers(case.model, case.weights, case.activations, case.load_dtype)


def our_dump(artifacts, case: Case):
    return artifacts.dump(artifacts.our_checkpoint(case.model, case.weights, case.activations))


@cases
def test_load_report_is_clean(artifacts, case):
    """No missing, unexpected or mismatched keys, no errors, nothing warned while loading."""
    view = loaded(artifacts, case)
    problems = {key: value for key, value in view.info.items() if value}
    assert not problems, f"loading info: {problems}"
    fail_on(view.warnings, "warnings while loading")


@cases
def test_transformers_quantizes_exactly_our_fp8_layers(artifacts, case):
    """Every Linear we left float is float in transformers (our `ignore` covers it, tied heads included)."""
    view, dump = loaded(artifacts, case), our_dump(artifacts, case)
    assert dump.config["form"] == "compressed-tensors"
    ours_fp8 = set(dump.layers)
    assert view.quantized == ours_fp8, (
        f"quantized by transformers only: {sorted(view.quantized - ours_fp8)}; "
        f"fp8 in our checkpoint only: {sorted(ours_fp8 - view.quantized)}; our ignore: {dump.config['ignore']}"
    )


def _float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


@cases
def test_weights_bit_equal_to_ours(artifacts, case):
    """The fp8 codes, scales and biases transformers loads are ours, and the weights it decompresses
    are our dequantized weights, bit for bit.

    compressed-tensors makes each `weight_scale` parameter in the model's dtype and transformers casts
    the checkpoint's float32 scales (weight and input) into it: for a bf16 model the scales it holds are ours rounded to
    bf16 and it decompresses `codes.to(bf16) * scale` (ours computed the same way is what it must
    hold); loaded with `dtype=torch.float32` (the `-as-float32` case) it holds our float32 scales.
    """
    view, dump = loaded(artifacts, case), our_dump(artifacts, case)
    mismatches = []
    for prefix in dump.layers:
        if prefix not in view.quantized:
            mismatches.append(f"{prefix}: not quantized by transformers")
            continue
        scale_dtype = view.scales[prefix].dtype
        our_scale = dump.get(prefix, "weight_scale")
        if scale_dtype == torch.float32:
            our_weight = dump.get(prefix, "weight")
        else:
            our_weight = dump.codes(prefix).to(scale_dtype) * our_scale.to(scale_dtype)
        checks = {
            "fp8 codes": (dump.codes(prefix), view.codes[prefix]),
            "weight_scale": (our_scale.to(scale_dtype), view.scales[prefix]),
            "dequantized weight": (our_weight.to(view.dtype), view.weights[prefix]),
        }
        if dump.get(prefix, "input_scale") is not None:
            theirs = view.input_scales.get(prefix)
            checks["input_scale"] = (dump.get(prefix, "input_scale").to(scale_dtype), theirs)
        if dump.get(prefix, "bias") is not None:
            checks["bias"] = (dump.get(prefix, "bias"), _float32(view.biases.get(prefix)))
        for what, (mine, theirs) in checks.items():
            problem = "missing in transformers" if theirs is None else bit_mismatch(mine, theirs)
            if problem:
                mismatches.append(f"{prefix} {what}: {problem}")
    scale_dtypes = sorted({str(scale.dtype) for scale in view.scales.values()})
    fail_on(mismatches, f"transformers holds weights in {view.dtype}, scales in {scale_dtypes}")


@cases
def test_output_close_to_float_model(artifacts, case):
    """Logits (BERT: last hidden state) on random token ids: cosine similarity with the float model's."""
    reference = artifacts.float_model(case.model).output
    similarity = cosine(loaded(artifacts, case).output, reference)
    assert similarity > COSINE, f"cosine similarity {similarity:.5f} with the float model"


@cases
def test_layer_outputs_close_to_float_layers(artifacts, case):
    """Each fp8 Linear on the float model's inputs to it: relative error against the float layer's output."""
    float_model, view = artifacts.float_model(case.model), loaded(artifacts, case)
    errors = {
        prefix: relative_error(out, float_model.layer_outputs[prefix]) for prefix, out in view.layer_outputs.items()
    }
    assert errors, "no quantized layer"
    bad = {prefix: f"{error:.3f}" for prefix, error in errors.items() if not error < LAYER_TOLERANCE}
    assert not bad, f"relative error over {LAYER_TOLERANCE}: {bad}"


def test_layer_check_catches_a_wrong_scale_or_a_transpose(artifacts):
    """The per-layer tolerance is tight enough: a doubled scale (so a doubled weight) or a transposed weight
    exceeds it twice over."""
    float_model = artifacts.float_model("llama")
    model, _, _ = torch_side.load(float_model.spec, artifacts.our_checkpoint("llama", "channel", "dynamic"))
    prefix = "model.layers.0.self_attn.o_proj"  # square, so a transposed weight still runs
    layer = model.get_submodule(prefix)
    x, expected = float_model.layer_inputs[prefix], float_model.layer_outputs[prefix]
    with torch.no_grad():
        model(input_ids=float_model.ids)  # decompresses the weights
        good = relative_error(layer(x), expected)
        weight = layer.weight.detach().clone()
        layer.weight.data = weight.T.contiguous()
        transposed = relative_error(layer(x), expected)
        layer.weight.data = weight * 2
        doubled = relative_error(layer(x), expected)
    assert good < LAYER_TOLERANCE < min(transposed, doubled) / 2, (good, transposed, doubled)
