"""FP8 safetensors checkpoints in the layout vLLM loads: reading, writing, converting, loading onto Flax."""

from w8a8_jax.checkpoint.config import QuantizationConfig
from w8a8_jax.checkpoint.flax_io import fused_params, linen_fp8_tensors, load_linen, load_nnx, nnx_fp8_tensors
from w8a8_jax.checkpoint.layers import (
    DEFAULT_EXCLUDE,
    NOT_LINEAR,
    Fp8LayerTensors,
    fp8_layer_prefixes,
    ignored_layers,
    linear_weight_prefixes,
    quantize_checkpoint,
    quantize_linear,
    read_fp8_layer,
    read_fp8_layers,
    read_quantization_config,
)
from w8a8_jax.checkpoint.report import CheckpointLayerReport, compare_checkpoints
from w8a8_jax.checkpoint.safetensors_io import CheckpointWriter, SafetensorsCheckpoint, write_checkpoint

__all__ = [
    "DEFAULT_EXCLUDE",
    "NOT_LINEAR",
    "CheckpointLayerReport",
    "CheckpointWriter",
    "Fp8LayerTensors",
    "QuantizationConfig",
    "SafetensorsCheckpoint",
    "compare_checkpoints",
    "fp8_layer_prefixes",
    "fused_params",
    "ignored_layers",
    "linear_weight_prefixes",
    "linen_fp8_tensors",
    "load_linen",
    "load_nnx",
    "nnx_fp8_tensors",
    "quantize_checkpoint",
    "quantize_linear",
    "read_fp8_layer",
    "read_fp8_layers",
    "read_quantization_config",
    "write_checkpoint",
]
