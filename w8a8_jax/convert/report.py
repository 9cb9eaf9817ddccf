"""The converter's per-layer report: statistics gathered on calibration batches, merged, summarized."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, metrics
from w8a8_jax.scheme import Fp8Scheme
from w8a8_jax.table import format_table


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One converted layer's calibration and accuracy on the calibration batches.

    Attributes:
      path: "/"-joined module path.
      weight_granularity, activation_scheme: how it was quantized.
      input_amax: max |input| seen.
      input_scale: the static scale set from `input_amax` (None for dynamic schemes).
      saturated_fraction: fraction of input values beyond the clamp (`input_scale * fp8_max` for
        static, `scale_ub` for per-token with a bound; 0 for dynamic scales, which never clip).
      sqnr_db: `10 log10(sum y^2 / sum (y_fp8 - y)^2)` over all outputs, y the float layer's.
      max_rel_error: `max |y_fp8 - y| / max |y|`.
    """

    path: str
    weight_granularity: str
    activation_scheme: str
    input_amax: float
    input_scale: float | None
    saturated_fraction: float
    sqnr_db: float
    max_rel_error: float


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """The per-layer reports of a conversion; `str(report)` is a table."""

    layers: tuple[LayerReport, ...] = ()

    def __getitem__(self, path: str) -> LayerReport:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    def table(self) -> str:
        header = ("layer", "weight", "activation", "amax", "scale", "saturated", "SQNR dB", "max rel err")
        rows = [
            (
                layer.path,
                layer.weight_granularity,
                layer.activation_scheme,
                f"{layer.input_amax:.4g}",
                "-" if layer.input_scale is None else f"{layer.input_scale:.4g}",
                f"{layer.saturated_fraction:.2%}",
                f"{layer.sqnr_db:.2f}",
                f"{layer.max_rel_error:.3g}",
            )
            for layer in self.layers
        ]
        return format_table(header, rows)

    __str__ = table


# Per-layer statistics, accumulated over batches; each is merged with `STAT_REDUCE`.
STAT_REDUCE = {
    "input_amax": jnp.maximum,
    "saturated": jnp.add,
    "count": jnp.add,
    "signal": jnp.add,
    "noise": jnp.add,
    "max_error": jnp.maximum,
    "max_ref": jnp.maximum,
    "nonfinite": jnp.add,
}


def clip_bound(scheme: Fp8Scheme, input_scale, fp8_dtype) -> float:
    if scheme.is_static:
        return float(np.asarray(input_scale).reshape(())) * dtypes.fp8_max(fp8_dtype)
    if scheme.scale_ub is not None:
        return scheme.scale_ub
    return math.inf


def layer_stats(inputs, y_float, y_fp8, clip: float) -> dict[str, jax.Array]:
    """Float32 sums and maxima of one batch, for `STAT_REDUCE` to merge."""
    abs_x = jnp.abs(inputs.astype(jnp.float32))
    y_float = y_float.astype(jnp.float32)
    error = y_fp8.astype(jnp.float32) - y_float
    return {
        "input_amax": jnp.max(abs_x, initial=0.0),
        "saturated": jnp.sum(abs_x > clip).astype(jnp.float32),
        "count": jnp.float32(abs_x.size),
        "signal": jnp.sum(jnp.square(y_float)),
        "noise": jnp.sum(jnp.square(error)),
        "max_error": jnp.max(jnp.abs(error), initial=0.0),
        "max_ref": jnp.max(jnp.abs(y_float), initial=0.0),
        "nonfinite": jnp.sum(~jnp.isfinite(abs_x)).astype(jnp.float32),
    }


def merge_stats(total: dict | None, stats: dict) -> dict:
    if total is None:
        return stats
    return {name: STAT_REDUCE[name](total[name], stats[name]) for name in stats}


def layer_report(path: str, scheme: Fp8Scheme, input_scale, stats: dict) -> LayerReport:
    """One layer's report from its statistics merged over the batches."""
    stats = {name: float(value) for name, value in stats.items()}
    return LayerReport(
        path=path,
        weight_granularity=scheme.weight_granularity,
        activation_scheme=scheme.activation_scheme,
        input_amax=stats["input_amax"],
        input_scale=None if input_scale is None else float(np.asarray(input_scale).reshape(())),
        saturated_fraction=stats["saturated"] / max(stats["count"], 1.0),
        sqnr_db=metrics.sqnr_db_of_energies(stats["signal"], stats["noise"]),
        max_rel_error=metrics.rel_error_of_maxima(stats["max_error"], stats["max_ref"]),
    )
