"""The torch side: loading fp8 checkpoints in transformers, running llm-compressor, comparing tensors."""

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path

import pytest
import torch
from loguru import logger as loguru_logger
from transformers import CompressedTensorsConfig, FineGrainedFP8Config, PreTrainedTokenizerFast

from interop import models

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def captured_warnings():
    """Collects the warnings of the block: Python's, transformers' logging, loguru's (compressed-tensors)."""
    records: list[str] = []
    handler = _ListHandler(records)
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    sink = loguru_logger.add(lambda message: records.append(f"loguru: {message.record['message']}"), level="WARNING")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        library_logger.removeHandler(handler)
        loguru_logger.remove(sink)


def load(
    spec: models.ModelSpec,
    directory: Path,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
    form: str = "compressed-tensors",
):
    """`(model, loading_info, warnings)` from `from_pretrained` of a quantized checkpoint; with
    `dequantize`, asking the loader of its `form` ("compressed-tensors" or "fp8", transformers'
    FineGrainedFP8) to decompress every weight to float while loading."""
    kwargs = {"output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if dequantize:
        config = CompressedTensorsConfig if form == "compressed-tensors" else FineGrainedFP8Config
        kwargs["quantization_config"] = config(dequantize=True)
    with captured_warnings() as records:
        model, info = spec.auto_class.from_pretrained(directory, **kwargs)
    return model.eval(), info, records


@contextlib.contextmanager
def fp8_linear_modules_on_cpu():
    """Lets transformers load a FineGrainedFP8 checkpoint into its `FP8Linear` modules on CPU.

    Without a GPU its quantizer's environment check switches to dequantizing every weight while
    loading; skipped, the model gets the modules, parameters and keys a GPU user gets. Their
    forward pass needs the CUDA kernel and cannot run here.
    """
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    check = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = check


@torch.no_grad()
def output_with_layers(model: torch.nn.Module, ids: torch.Tensor, layer, prefixes) -> torch.Tensor:
    """`models.output(model, ids)` with the output of each module in `prefixes` replaced by
    `layer(prefix, its input)` (a forward hook: the module's own result is discarded)."""

    def hook(prefix):
        return lambda module, args, result: layer(prefix, args[0]).to(result.dtype)

    handles = [model.get_submodule(prefix).register_forward_hook(hook(prefix)) for prefix in prefixes]
    try:
        return models.output(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class Loaded:
    """What transformers makes of a quantized checkpoint, as the tests look at it.

    `codes`, `scales`, `input_scales`: the fp8 state loaded (before any forward pass), by module
    name; `weights`: the dequantized weights it holds once the first forward pass has decompressed
    them; `biases`; `output`: its output on the eval ids; `layer_outputs`: each quantized module
    run on the float model's inputs to it.
    """

    info: dict
    warnings: list[str]
    quantized: set[str]
    codes: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    input_scales: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    output: torch.Tensor
    layer_outputs: dict[str, torch.Tensor]
    dtype: torch.dtype


@torch.no_grad()
def snapshot(
    spec: models.ModelSpec,
    directory: Path,
    ids: torch.Tensor,
    layer_inputs: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> Loaded:
    """Loads `directory` in transformers as a user does (compressed), and records what it holds and computes."""
    model, info, records = load(spec, directory, dtype)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {name for name, m in linears.items() if getattr(m, "quantization_scheme", None) is not None}
    codes = {name: linears[name].weight.detach().clone() for name in quantized}
    scales = {name: linears[name].weight_scale.detach().clone() for name in quantized}
    input_scales = {
        name: linears[name].input_scale.detach().clone() for name in quantized if hasattr(linears[name], "input_scale")
    }
    output = models.output(model, ids)  # the first forward pass decompresses the weights
    held = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() > 1)
    layer_outputs = {name: linears[name](layer_inputs[name].to(held)) for name in quantized if name in layer_inputs}
    return Loaded(
        info=info,
        warnings=records,
        quantized=quantized,
        codes=codes,
        scales=scales,
        input_scales=input_scales,
        weights={name: linears[name].weight.detach().clone() for name in quantized},
        biases={name: m.bias.detach().clone() for name, m in linears.items() if m.bias is not None},
        output=output,
        layer_outputs=layer_outputs,
        dtype=held,
    )


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of the tiny vocabulary built in memory: llm-compressor wants a processor with a dataset."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"t{i}": i for i in range(models.VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0", pad_token="t0"
    )


def llmcompressor_recipe(scheme: str):
    """llm-compressor's `QuantizationModifier` for every Linear but lm_head: a preset `scheme`
    (FP8_DYNAMIC, FP8, FP8_BLOCK), or `FP8_BLOCK_{R}x{C}`, FP8_BLOCK with R x C weight blocks and
    activation groups of C (the preset's 128x128 blocks cover the tiny models' layers in one)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if not scheme.startswith("FP8_BLOCK_"):
        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    rows, cols = (int(size) for size in scheme.removeprefix("FP8_BLOCK_").split("x"))
    common = dict(num_bits=8, type="float", symmetric=True)
    group = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**common, strategy="block", dynamic=False, block_structure=[rows, cols]),
        input_activations=QuantizationArgs(**common, strategy="group", dynamic=True, group_size=cols),
    )
    return QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"])


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """A block scale `(ceil(N / bn), ceil(K / bk))` as the `(N, K)` tensor of each element's scale."""
    (rows, cols), (bn, bk) = shape, block
    return scale.repeat_interleave(bn, dim=0)[:rows].repeat_interleave(bk, dim=1)[:, :cols]


def llmcompressor_quantize(spec: models.ModelSpec, float_dir: Path, scheme: str, output: Path) -> None:
    """llm-compressor's `oneshot` with `scheme` (`llmcompressor_recipe`; FP8 is static, calibrated on
    random token ids) on every Linear but lm_head, saved compressed to `output`."""
    from datasets import Dataset
    from llmcompressor import oneshot

    model = spec.auto_class.from_pretrained(float_dir)
    recipe = llmcompressor_recipe(scheme)
    kwargs = {}
    if scheme == "FP8":
        ids = models.token_ids(models.CALIBRATION_SEED, batch=8)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kwargs = dict(
            dataset=data,
            processor=word_level_tokenizer(),
            num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1],
        )
    oneshot(model=model, recipe=recipe, **kwargs)
    with warnings.catch_warnings():
        # oneshot moves the model under compressed-tensors' offloading, which on CPU is no offloading at all.
        warnings.filterwarnings("ignore", "Attempting to save a model with offloaded modules", UserWarning)
        model.save_pretrained(output, save_compressed=True)


# ----------------------------------------------------------------------------------------------
# comparisons


def fail_on(problems: list[str], heading: str) -> None:
    """Fails the test with every problem, one a line, if there is any."""
    if problems:
        pytest.fail(f"{heading}:\n" + "\n".join(problems), pytrace=False)


def bit_mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> str | None:
    """None if the two tensors have the same shape, dtype and bits, else what differs."""
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return f"ours {ours.dtype} {tuple(ours.shape)} vs theirs {theirs.dtype} {tuple(theirs.shape)}"
    view = _INT_VIEW.get(ours.dtype, torch.uint8)
    differ = ours.contiguous().view(view) != theirs.contiguous().view(view)
    if not differ.any():
        return None
    error = (ours.double() - theirs.double()).abs()
    return (
        f"{int(differ.sum())}/{differ.numel()} elements differ, max abs diff {float(error.max()):.3g} "
        f"(max |ours| {float(ours.double().abs().max()):.3g})"
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approx - exact|| / ||exact||` over all elements."""
    exact = exact.double()
    return float((approx.double() - exact).norm() / exact.norm())
