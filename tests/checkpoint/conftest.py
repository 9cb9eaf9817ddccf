"""Shared fixtures of the checkpoint tests: vLLM-layout checkpoints written by hand with safetensors.

The fixtures never call w8a8_jax: tensors come from the NumPy references and are saved with
`safetensors.numpy.save_file`, `config.json` is written as literal JSON from the format description.
"""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests import reference

FP8_FORM_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
FP8_FORM_DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def compressed_tensors(weight_strategy: str, input_strategy: str, dynamic: bool) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it (one group, Linear targets)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": weight_strategy, "symmetric": True,
                            "dynamic": False, "group_size": None, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": input_strategy,
                                      "symmetric": True, "dynamic": dynamic, "group_size": None},
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
    }  # fmt: skip


# (granularity, activation scheme) -> a quantization_config vLLM accepts for it.
CONFIGS = {
    ("per_tensor", "static"): FP8_FORM_STATIC,
    ("per_tensor", "dynamic_per_tensor"): FP8_FORM_DYNAMIC,
    ("per_channel", "static"): compressed_tensors("channel", "tensor", False),
    ("per_channel", "dynamic_per_tensor"): compressed_tensors("channel", "tensor", True),
    ("per_channel", "dynamic_per_token"): compressed_tensors("CHANNEL", "TOKEN", True),
    ("per_tensor", "dynamic_per_token"): compressed_tensors("TENSOR", "token", True),
}


# Block fp8 in both forms, as DeepSeek-V3's config.json (transformers' FineGrainedFP8) and
# llm-compressor's FP8_BLOCK scheme write them.
FP8_FORM_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head"],
}


def compressed_tensors_block(block=(128, 128)) -> dict:
    """compressed-tensors' FP8_BLOCK group: static block weights, dynamic activations per group of bk."""
    config = compressed_tensors("block", "group", True)
    group = config["config_groups"]["group_0"]
    group["weights"]["block_structure"] = list(block)
    group["input_activations"]["group_size"] = block[1]
    group["input_activations"]["observer"] = None
    return config


def block_layer(rng, prefix: str, n: int, k: int, block=(128, 128), scale_name="weight_scale", bias=True) -> dict:
    """One block-scaled layer's tensors (`{prefix}.weight`, `{prefix}.{scale_name}` F32
    `(ceil(n / bn), ceil(k / bk))`, a bf16 bias), the codes and scales from the NumPy reference;
    the block magnitudes vary over two decades so that a scale applied to the wrong block shows."""
    magnitude = np.exp(rng.uniform(-2.5, 2.0, (-(-n // block[0]), -(-k // block[1]))))
    weight = random_float(rng, (n, k)) * np.repeat(np.repeat(magnitude, block[0], 0), block[1], 1)[:n, :k]
    codes, scale = reference.quant_block_weight(weight.astype(np.float32), block)
    tensors = {f"{prefix}.weight": codes, f"{prefix}.{scale_name}": scale}
    if bias:
        tensors[f"{prefix}.bias"] = random_float(rng, (n,)).astype(ml_dtypes.bfloat16)
    return tensors


def random_float(rng: np.random.Generator, shape, low=0.05) -> np.ndarray:
    """Float32 values with |x| in [low, 1 + low): random signs, never zero."""
    return (rng.uniform(low, 1 + low, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def vllm_layer(rng, prefix: str, n: int, k: int, granularity: str, static: bool, bias: bool = True) -> dict:
    """One layer's tensors as vLLM stores them; also returns its float weight under `_float`."""
    weight = random_float(rng, (n, k))
    if granularity == "per_tensor":
        codes, scale = reference.quant_dynamic_per_tensor(weight)
        scale = scale.reshape(())  # the fp8 form stores scalars
    else:
        codes, scale = reference.quant_dynamic_per_token(weight)
    tensors = {f"{prefix}.weight": codes, f"{prefix}.weight_scale": scale}
    if static:
        tensors[f"{prefix}.input_scale"] = np.array(rng.uniform(0.004, 0.01), np.float32).reshape(())
    if bias:
        tensors[f"{prefix}.bias"] = random_float(rng, (n,)).astype(ml_dtypes.bfloat16)
    return tensors


def write_vllm_checkpoint(directory, tensors: dict, quantization_config: dict | None, model_config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = dict(model_config or {"architectures": ["TestModel"], "hidden_size": 0})
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def rng(request):
    """A NumPy generator unique to the test."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
