"""FP8 linear layers in a checkpoint: validated reading, float -> fp8 conversion, and the Flax state.

A layer with checkpoint prefix `p` is stored as vLLM loads it:
  `p.weight`            F8_E4M3 `(N, K)`
  `p.weight_scale`      F32, BF16 or F16, scalar or `(1,)` (per tensor), `(N, 1)` (per channel) or
                        `(ceil(N / bn), ceil(K / bk))` (per `(bn, bk)` block, compressed-tensors form)
  `p.weight_scale_inv`  the block scales of the fp8 form instead (DeepSeek-V3's name; like
                        `weight_scale` it multiplies the codes)
  `p.input_scale`       F32, BF16 or F16, scalar or `(1,)` (static activation scheme only)
  `p.bias`              `(N,)`, any float dtype (optional)
with `dequant(weight)[n, k] = weight[n, k].astype(f32) * scale[n // bn, k // bk]` for blocks (the
last block of a row or column may be partial), `weight.astype(f32) * weight_scale` otherwise.
Scales are read in float32 (upcast exactly: llm-compressor stores them in the model's dtype); we
write F32. A scale tensor the checkpoint's form does not use is an error, never dropped.
"""

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from w8a8_jax import layout, quantization, validation
from w8a8_jax.checkpoint.config import QuantizationConfig
from w8a8_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from w8a8_jax.params import Fp8Params

FLOAT_DTYPES = ("F32", "BF16", "F16")
# Float weights `quantize` converts (F64 is computed in float32, like every float weight).
QUANTIZABLE_DTYPES = ("F64", *FLOAT_DTYPES)
# 2-D weights that are not linear layers (embedding tables, norms), by name: a checkpoint without its
# model code says no more.
NOT_LINEAR = r"(?i:(^|\.)(embed[^.]*|[^.]*norm[^.]*)(\.|$))"
# Layers a checkpoint converter leaves float unless told otherwise: those, and the LM head.
DEFAULT_EXCLUDE = r"(?i:(^|\.)(embed[^.]*|[^.]*norm[^.]*|lm_head)(\.|$))"
# Every per-layer scale leaf either form (or transformers' static FineGrainedFP8) stores: a layer
# holding one its checkpoint's form does not use is refused rather than read without it.
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "input_scale", "activation_scale")


@dataclasses.dataclass(frozen=True)
class Fp8LayerTensors:
    """One fp8 linear layer as read from a checkpoint, validated.

    Invariant: `weight (N, K)` float8_e4m3fn; `weight_scale` float32, finite and > 0, `(1,)` or
    `(N, 1)`, or `(ceil(N / bn), ceil(K / bk))` when `block_size` is `(bn, bk)` (whichever name the
    checkpoint stores it under); `input_scale (1,)` float32, finite and > 0, present exactly for
    the static scheme; `bias (N,)` or None. `dequantized()` is the weight they stand for.
    """

    prefix: str
    weight: np.ndarray
    weight_scale: np.ndarray
    input_scale: np.ndarray | None
    bias: np.ndarray | None
    block_size: tuple[int, int] | None = None

    def params(self) -> Fp8Params:
        """As `Fp8Dense` parameters."""
        return Fp8Params.create(self.weight, self.weight_scale, self.input_scale, self.bias, block_size=self.block_size)

    def dequantized(self) -> np.ndarray:
        """The float32 weight `(N, K)`: each code times its scale (its block's, row's or the tensor's),
        one exact float32 product per element, as transformers and compressed-tensors compute it."""
        return self.weight.astype(np.float32) * self.expanded_scale()

    def expanded_scale(self) -> np.ndarray:
        """Each weight element's scale, float32: `(N, K)` for blocks, else `(1, 1)` or `(N, 1)`."""
        if self.block_size is None:
            return self.weight_scale.reshape(-1, 1)
        (bn, bk), (n, k) = self.block_size, self.weight.shape
        return np.repeat(np.repeat(self.weight_scale, bn, axis=0)[:n], bk, axis=1)[:, :k]


def _check_scale(name: str, scale: np.ndarray) -> None:
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"{name} holds NaN or Inf")
    if not np.all(scale > 0):
        raise ValueError(f"{name} must be > 0, holds {float(np.min(scale))}")


def _check_scale_dtype(checkpoint: SafetensorsCheckpoint, name: str) -> None:
    if checkpoint.dtype_name(name) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be F32, BF16 or F16, got {checkpoint.dtype_name(name)}")


def fp8_layer_prefixes(checkpoint: SafetensorsCheckpoint) -> list[str]:
    """The prefixes of every fp8 weight in the checkpoint, and of every orphaned scale (any of
    `SCALE_LEAVES`), which reading then refuses by name."""
    prefixes = set()
    for name in checkpoint.names:
        if name.endswith(".weight") and checkpoint.dtype_name(name).startswith("F8_"):
            prefixes.add(name.removesuffix(".weight"))
        elif name.endswith(tuple(f".{leaf}" for leaf in SCALE_LEAVES)):
            prefixes.add(name.rsplit(".", 1)[0])
    return sorted(prefixes)


def _check_scale_leaves(checkpoint: SafetensorsCheckpoint, prefix: str, config: QuantizationConfig) -> None:
    """Every scale tensor of layer `prefix` must be one the checkpoint's form reads: a block scale
    under the other form's name, or an activation scale dynamic activations have no use for,
    would otherwise be left behind silently."""
    used = {config.weight_scale_name} | ({"input_scale"} if config.is_static else set())
    for leaf in SCALE_LEAVES:
        name = f"{prefix}.{leaf}"
        if leaf in used or name not in checkpoint:
            continue
        if leaf == "input_scale":
            raise ValueError(
                f"{name} is present but the checkpoint's activation scheme is {config.activation_scheme!r}"
            )
        form = f"the {config.form!r} form of {config.weight_granularity} weights"
        if leaf in ("weight_scale", "weight_scale_inv"):
            hint = "" if f"{prefix}.{config.weight_scale_name}" in checkpoint else " (which is missing)"
            if leaf == "weight_scale_inv" and config.form == "fp8" and not config.is_block:
                hint += "; block scales need weight_block_size in the fp8 form's quantization_config"
            raise ValueError(
                f"{name} is present but {form} stores the weight scale as {prefix}.{config.weight_scale_name}{hint}"
            )
        raise ValueError(f"{name} is present but {form} with {config.activation_scheme} activations reads no {leaf}")


def _read_weight_scale(
    checkpoint: SafetensorsCheckpoint, prefix: str, weight_shape: tuple[int, int], config: QuantizationConfig
) -> np.ndarray:
    """Layer `prefix`'s weight scale, float32: `(1,)` per tensor, `(N, 1)` per channel or
    `(ceil(N / bn), ceil(K / bk))` per block; ValueError naming the tensor on any other shape."""
    scale_name, weight_name = f"{prefix}.{config.weight_scale_name}", f"{prefix}.weight"
    scale_shape = checkpoint.shape(scale_name)
    _check_scale_dtype(checkpoint, scale_name)
    rows, cols = weight_shape
    if config.is_block:
        (bn, bk) = config.block_size
        allowed = [(layout.num_blocks(rows, bn), layout.num_blocks(cols, bk))]
        need = f"{allowed[0]} (ceil(N / {bn}), ceil(K / {bk}))"
        what = f"{bn}x{bk}-block weights"
    else:
        allowed = [(), (1,)] if config.weight_granularity == "per_tensor" else [(rows, 1)]
        need, what = " or ".join(map(str, allowed)), f"{config.weight_granularity} weights"
    if scale_shape not in allowed:
        raise ValueError(f"{scale_name} has shape {scale_shape}; {what} of {weight_name} {weight_shape} need {need}")
    weight_scale = np.asarray(checkpoint.tensor(scale_name), np.float32).reshape(allowed[-1] or (1,))
    _check_scale(scale_name, weight_scale)
    return weight_scale


def read_fp8_layer(checkpoint: SafetensorsCheckpoint, prefix: str, config: QuantizationConfig) -> Fp8LayerTensors:
    """Reads and validates one layer; every inconsistency is a ValueError naming the tensor."""
    weight_name, scale_name, input_name, bias_name = (
        f"{prefix}.{s}" for s in ("weight", config.weight_scale_name, "input_scale", "bias")
    )
    _check_scale_leaves(checkpoint, prefix, config)
    for name in (weight_name, scale_name):
        if name not in checkpoint:
            raise ValueError(f"missing tensor {name!r} (layer {prefix!r})")
    if checkpoint.dtype_name(weight_name) != "F8_E4M3":
        raise ValueError(f"{weight_name} must be F8_E4M3, got {checkpoint.dtype_name(weight_name)}")
    weight_shape = checkpoint.shape(weight_name)
    if len(weight_shape) != 2:
        raise ValueError(f"{weight_name} must be (N, K), got shape {weight_shape}")
    rows = weight_shape[0]
    weight_scale = _read_weight_scale(checkpoint, prefix, weight_shape, config)
    input_scale = None
    if config.is_static:
        if input_name not in checkpoint:
            raise ValueError(f"missing tensor {input_name!r}: the static activation scheme needs it (layer {prefix!r})")
        _check_scale_dtype(checkpoint, input_name)
        if checkpoint.shape(input_name) not in [(), (1,)]:
            raise ValueError(f"{input_name} must be a scalar or (1,), got shape {checkpoint.shape(input_name)}")
        input_scale = np.asarray(checkpoint.tensor(input_name), np.float32).reshape(1)
        _check_scale(input_name, input_scale)
    bias = None
    if bias_name in checkpoint:
        if checkpoint.dtype_name(bias_name) not in FLOAT_DTYPES or checkpoint.shape(bias_name) != (rows,):
            raise ValueError(
                f"{bias_name} must be a float ({rows},), got {checkpoint.dtype_name(bias_name)} {checkpoint.shape(bias_name)}"
            )
        bias = np.array(checkpoint.tensor(bias_name))
        if not np.all(np.isfinite(bias.astype(np.float32))):
            raise ValueError(f"{bias_name} holds NaN or Inf")
    weight = np.array(checkpoint.tensor(weight_name))
    if np.isnan(weight.astype(np.float32)).any():
        raise ValueError(f"{weight_name} holds NaN codes")
    return Fp8LayerTensors(prefix, weight, weight_scale, input_scale, bias, config.block_size)


def read_quantization_config(checkpoint: SafetensorsCheckpoint) -> QuantizationConfig:
    """The checkpoint's `quantization_config` (from its `config.json`); ValueError if it has none."""
    if "quantization_config" not in checkpoint.config:
        raise ValueError(f"{checkpoint.directory}: config.json has no quantization_config (not an fp8 checkpoint?)")
    return QuantizationConfig.from_dict(checkpoint.config["quantization_config"])


def read_fp8_layers(
    checkpoint: SafetensorsCheckpoint, config: QuantizationConfig | None = None
) -> Iterator[Fp8LayerTensors]:
    """Every fp8 layer, validated, one at a time (in name order)."""
    config = config or read_quantization_config(checkpoint)
    for prefix in fp8_layer_prefixes(checkpoint):
        yield read_fp8_layer(checkpoint, prefix, config)


# ----------------------------------------------------------------------------------------------
# float -> fp8


def linear_weight_prefixes(
    checkpoint: SafetensorsCheckpoint, include: str | None = None, exclude: str | None = DEFAULT_EXCLUDE
) -> tuple[list[str], list[str]]:
    """`(to quantize, left float)`: prefixes of the 2-D float `*.weight` tensors.

    `include` / `exclude` are regexes searched (`re.search`) in the prefix; a layer is quantized if
    it matches `include` (default: all) and not `exclude` (default: embeddings, norms, `lm_head`).
    """
    selected, skipped = [], []
    for name in checkpoint.names:
        if not name.endswith(".weight") or len(checkpoint.shape(name)) != 2:
            continue
        if checkpoint.dtype_name(name) not in QUANTIZABLE_DTYPES:
            continue
        prefix = name.removesuffix(".weight")
        chosen = (include is None or re.search(include, prefix)) and not (exclude and re.search(exclude, prefix))
        (selected if chosen else skipped).append(prefix)
    return selected, skipped


def quantize_linear(
    weight: np.ndarray, config: QuantizationConfig, input_amax: float | None = None, *, name: str = "weight"
) -> dict[str, np.ndarray]:
    """A float `(N, K)` checkpoint weight -> `{"weight", scale[, "input_scale"]}` as stored, the
    scale F32 under `config.weight_scale_name` ("weight_scale", or the fp8 form's block
    "weight_scale_inv").

    The weight goes through `quantization.quantize_weight` (one formula for every path); the fp8
    form stores scalar scales as vLLM's own checkpoints do, compressed-tensors `(1,)`; block scales
    are `(ceil(N / bn), ceil(K / bk))` in either form.
    """
    weight = np.asarray(weight)
    if weight.dtype == np.float64:
        weight = weight.astype(np.float32)
    fp8_weight, weight_scale = quantization.quantize_weight(
        jnp.asarray(weight), config.weight_granularity, jnp.float8_e4m3fn, block_size=config.block_size, name=name
    )
    scalar_shape = () if config.form == "fp8" else (1,)
    scale = np.asarray(weight_scale, np.float32)
    if config.weight_granularity == "per_tensor":
        scale = scale.reshape(scalar_shape)
    tensors = {"weight": np.asarray(fp8_weight), config.weight_scale_name: scale}
    if config.is_static:
        if input_amax is None:
            raise ValueError("static activation scheme needs an input amax")
        tensors["input_scale"] = np.asarray(quantization.static_input_scale(input_amax, jnp.float8_e4m3fn)).reshape(
            scalar_shape
        )
    return tensors


def ignored_layers(quantized: list[str], left_float: list[str]) -> tuple[str, ...]:
    """The `ignore` list of a converted checkpoint: every linear layer left float, by prefix.

    `left_float` are the float 2-D weights not quantized; embedding tables and norms are no linear
    layers and are not listed. `lm_head` is listed unless quantized, also when the file holds no
    `lm_head.weight` (tied to the embedding): a loader that quantizes every linear layer not
    ignored would otherwise look for its scales.
    """
    ignore = [prefix for prefix in left_float if not re.search(NOT_LINEAR, prefix)]
    if "lm_head" not in quantized and "lm_head" not in ignore:
        ignore.append("lm_head")
    return tuple(ignore)


def _calibration_amax(prefix: str, inputs: np.ndarray, features: int) -> float:
    """max |x| of one layer's calibration inputs `(..., K)`, which must be non-empty and finite."""
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim < 1 or inputs.shape[-1] != features or inputs.size == 0:
        raise ValueError(
            f"calibration inputs for {prefix!r} must be (..., {features}) with at least one row, got shape {inputs.shape}"
        )
    validation.check_finite(f"calibration inputs for {prefix!r}", inputs, "; calibration data must be finite")
    return float(np.max(np.abs(inputs)))


def quantize_checkpoint(
    source: SafetensorsCheckpoint,
    writer,
    config: QuantizationConfig,
    layers: list[str],
    *,
    calibration: Mapping[str, np.ndarray] | None = None,
    on_tensor: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Streams `source` into `writer`, quantizing the weights of `layers` (checkpoint prefixes).

    Each tensor is read, converted if needed, and handed to the writer before the next is read.
    Static layers take `input_scale = amax / fp8_max` of their `calibration` inputs (a mapping of
    layer prefix -> sample inputs `(..., K)`). `on_tensor(name, action)` is called per tensor.

    Returns one summary row per quantized layer (prefix, shape, bytes before and after, scales).
    """
    layer_set = set(layers)
    if config.is_static:
        missing = [prefix for prefix in layers if calibration is None or prefix not in calibration]
        if missing:
            raise ValueError(
                f"static activations need calibration inputs for every layer; missing: {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
    rows = []
    for name in source.names:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in layer_set:
            weight = source.tensor(name)
            amax = _calibration_amax(prefix, calibration[prefix], weight.shape[1]) if config.is_static else None
            validation.check_finite(name, weight, "; it cannot be quantized")
            quantized = quantize_linear(weight, config, amax, name=name)
            for key, array in quantized.items():
                writer.add(f"{prefix}.{key}", array)
            scale = quantized[config.weight_scale_name]
            rows.append(
                {
                    "layer": prefix,
                    "shape": tuple(weight.shape),
                    "dtype": source.dtype_name(name),
                    "bytes_in": source.nbytes(name),
                    "bytes_out": sum(a.nbytes for a in quantized.values()),
                    "scale_min": float(scale.min()),
                    "scale_max": float(scale.max()),
                    "input_scale": None if amax is None else float(quantized["input_scale"].reshape(())),
                }
            )
            action = "quantized"
        else:
            writer.add(name, source.tensor(name))
            action = "copied"
        if on_tensor is not None:
            on_tensor(name, action)
    return rows
