"""Per-layer accuracy of an FP8 checkpoint against the float checkpoint it came from."""

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from w8a8_jax import dense
from w8a8_jax.checkpoint.config import QuantizationConfig
from w8a8_jax.checkpoint.layers import fp8_layer_prefixes, read_fp8_layer, read_quantization_config
from w8a8_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from w8a8_jax.metrics import max_rel_error, sqnr_db


@dataclasses.dataclass(frozen=True)
class CheckpointLayerReport:
    """One layer: its weight error, and its output error on sample inputs (None without them).

    Attributes:
      layer: checkpoint prefix.
      shape: the weight's `(N, K)`.
      weight_sqnr_db, weight_max_abs_error, weight_max_rel_error: dequantized fp8 weight (codes
        times their tensor's, row's or block's scale) vs float.
      output_sqnr_db, output_max_rel_error: `fp8_dense(x)` vs `x @ W.T + b` (float32) on the inputs.
    """

    layer: str
    shape: tuple[int, int]
    weight_sqnr_db: float
    weight_max_abs_error: float
    weight_max_rel_error: float
    output_sqnr_db: float | None = None
    output_max_rel_error: float | None = None


def compare_checkpoints(
    float_checkpoint: SafetensorsCheckpoint,
    fp8_checkpoint: SafetensorsCheckpoint,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    config: QuantizationConfig | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> list[CheckpointLayerReport]:
    """Compares every fp8 layer of `fp8_checkpoint` with the same-named float weight.

    `inputs` maps layer prefixes to sample inputs `(..., K)`; those layers also get their output error
    through the fp8 layer call itself (`dense.fp8_dense`, the checkpoint's scheme).
    """
    config = config or read_quantization_config(fp8_checkpoint)
    reports = []
    for prefix in fp8_layer_prefixes(fp8_checkpoint):
        layer = read_fp8_layer(fp8_checkpoint, prefix, config)
        name = f"{prefix}.weight"
        if name not in float_checkpoint:
            raise ValueError(f"the float checkpoint has no {name!r} to compare with")
        weight = np.asarray(float_checkpoint.tensor(name), np.float32)
        if weight.shape != layer.weight.shape:
            raise ValueError(f"{name}: float shape {weight.shape} != fp8 shape {layer.weight.shape}")
        approx = layer.dequantized()
        output_sqnr = output_error = None
        if inputs is not None and prefix in inputs:
            x = np.asarray(inputs[prefix], np.float32)
            if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
                raise ValueError(
                    f"inputs for {prefix!r} have shape {x.shape}; {name} {weight.shape} needs (..., {weight.shape[1]})"
                )
            x = x.reshape(-1, weight.shape[1])
            bias_name = f"{prefix}.bias"
            bias = np.asarray(float_checkpoint.tensor(bias_name), np.float32) if bias_name in float_checkpoint else 0.0
            y_float = x @ weight.T + bias
            params = layer.params()
            y_fp8 = dense.fp8_dense(jnp.asarray(x), params, scheme=config.scheme, out_dtype=jnp.float32)
            output_sqnr, output_error = sqnr_db(y_float, y_fp8), max_rel_error(y_float, y_fp8)
        reports.append(
            CheckpointLayerReport(
                prefix,
                tuple(weight.shape),
                sqnr_db(weight, approx),
                float(np.max(np.abs(approx - weight))),
                max_rel_error(weight, approx),
                output_sqnr,
                output_error,
            )
        )
        if on_layer is not None:
            on_layer(prefix)
    return reports
