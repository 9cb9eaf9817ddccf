"""Post-training quantization of whole Flax models: rules, static calibration and a per-layer report.

`quantize_nnx` replaces the `nnx.Linear` layers of a module graph that a rule matches with
`w8a8_jax.nnx.Fp8Dense`; `quantize_linen` converts a linen parameter tree and returns a model whose
matched `nn.Dense` calls run in fp8. Rules are regexes on the "/"-joined module path (e.g.
"layers/0/attn/qkv_proj"), tried in order; the first whose `re.fullmatch` succeeds decides, and
layers no rule matches stay float.

With calibration batches, the float model is run twice: first to record each converted layer's
input amax (which sets `input_scale` of static layers), then to compare each fp8 layer against the
float layer it replaces, on the float layer's own inputs, for the report.
"""

from w8a8_jax.convert.linen import LinenFp8Model, quantize_linen
from w8a8_jax.convert.nnx import quantize_nnx
from w8a8_jax.convert.report import LayerReport, QuantizationReport
from w8a8_jax.convert.rules import QuantizationRule, find_rule

__all__ = [
    "LayerReport",
    "LinenFp8Model",
    "QuantizationReport",
    "QuantizationRule",
    "find_rule",
    "quantize_linen",
    "quantize_nnx",
]
