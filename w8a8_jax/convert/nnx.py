"""Post-training quantization of nnx models: `nnx.Linear` layers matched by rules become `Fp8Dense`.

With calibration batches the float model runs twice: first to record each converted layer's input
amax (which sets `input_scale` of static layers), then to compare each fp8 layer against the float
layer it replaces, on the float layer's own inputs, for the report.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from flax import nnx

from w8a8_jax import module_tree, platform
from w8a8_jax import nnx as fp8_nnx
from w8a8_jax.convert import report as report_lib
from w8a8_jax.convert import rules as rules_lib


class _Observer(nnx.Module):
    """Stands in for a float `nnx.Linear` during calibration: returns its output, records statistics."""

    def __init__(self, linear: nnx.Linear, fp8_layer: fp8_nnx.Fp8Dense | None, clip: float):
        self.linear = linear
        self.fp8_layer = fp8_layer
        self.clip = clip
        self.stats = nnx.Variable(None)

    def __call__(self, inputs):
        y_float = self.linear(inputs)
        y_fp8 = y_float if self.fp8_layer is None else self.fp8_layer(inputs)
        self.stats.set_value(
            report_lib.merge_stats(self.stats.get_value(), report_lib.layer_stats(inputs, y_float, y_fp8, self.clip))
        )
        return y_float


def _run_observed(model, targets, fp8_layers, batches, forward, fp8_dtype) -> dict[str, dict]:
    """Runs `forward` over `batches` with observers in place of the targets; their merged stats."""
    observers = {}
    for path, parent, key, linear, rule in targets:
        fp8_layer = fp8_layers.get(path)
        clip = math.inf
        if fp8_layer is not None:
            input_scale = None if fp8_layer.input_scale is None else fp8_layer.input_scale[...]
            clip = report_lib.clip_bound(rule.scheme, input_scale, fp8_dtype)
        observers[path] = _Observer(linear, fp8_layer, clip)
        module_tree.set_child(parent, key, observers[path])
    try:
        for index, batch in enumerate(batches):
            forward(model, batch)
            rules_lib.check_batch_stats(index, {path: o.stats.get_value() for path, o in observers.items()})
    finally:
        for path, parent, key, linear, rule in targets:
            module_tree.set_child(parent, key, linear)
    return {path: observer.stats.get_value() for path, observer in observers.items()}


def quantize_nnx(
    model: nnx.Module,
    rules: Sequence[rules_lib.QuantizationRule],
    *,
    calibration_data: Iterable[Any] = (),
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    fp8_dtype=None,
) -> report_lib.QuantizationReport:
    """Replaces, in place, the `nnx.Linear` layers of `model` that `rules` match with `Fp8Dense`.

    Args:
      model: an nnx module graph; its `nnx.Linear` children (at any depth, in attributes or lists)
        are the candidates, found by their "/"-joined path.
      rules: tried in order; the first match decides (see `QuantizationRule`).
      calibration_data: batches to run through the float model; needed by static layers (their
        `input_scale` is `amax / fp8_max` over all batches), and with them the report is filled.
      forward: `forward(model, batch)` runs one batch; default `model(batch)`. It runs eagerly or
        under `nnx.jit`; layers stacked by `nnx.scan` convert (dynamic schemes) but are not observed.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz; default the platform's.

    Returns:
      A `QuantizationReport` with one row per converted layer observed on `calibration_data`.
      A converted layer returns the dtype its float layer returned (`result_type(input, kernel,
      bias)`, or the layer's `dtype`).
    """
    forward = forward or (lambda module, batch: module(batch))
    fp8_dtype = platform.resolve_fp8_dtype(fp8_dtype)
    batches = list(calibration_data)
    targets = []
    for path, path_keys, node in module_tree.find_layers(model, (nnx.Linear,)):
        rule = rules_lib.find_rule(rules, path)
        if rule is not None:
            targets.append((path, module_tree.parent_of(model, path_keys), path_keys[-1], node, rule))
    stacked = {path for path, _, _, linear, _ in targets if linear.kernel[...].ndim > 2}
    observed = [target for target in targets if target[0] not in stacked]
    rules_lib.check_calibration(
        [t[0] for t in observed if t[4].scheme.is_static],
        [t[0] for t in targets if t[0] in stacked and t[4].scheme.is_static],
        batches,
    )

    amax = _run_observed(model, observed, {}, batches, forward, fp8_dtype) if batches else {}
    fp8_layers = {}
    for path, _, _, linear, rule in targets:
        scheme, to_params = rules_lib.params_maker(path, rule, amax, fp8_dtype)
        kernel = linear.kernel[...]
        rules_lib.check_kernel(path, kernel)
        bias = None if linear.bias is None else linear.bias[...]
        for _ in range(kernel.ndim - 2):  # layers stacked by nnx.scan/vmap: quantize each slice
            to_params = jax.vmap(to_params)
        fp8_layers[path] = fp8_nnx._stand_in(to_params(kernel, bias), scheme=scheme, layer=linear)

    reports = []
    if batches and observed:
        stats = _run_observed(model, observed, fp8_layers, batches, forward, fp8_dtype)
        for path, _, _, _, rule in observed:
            if stats[path] is None:  # not called on calibration_data: nothing to report
                continue
            layer = fp8_layers[path]
            reports.append(
                report_lib.layer_report(
                    path, rule.scheme, None if layer.input_scale is None else layer.input_scale[...], stats[path]
                )
            )
    for path, parent, key, _, _ in targets:
        module_tree.set_child(parent, key, fp8_layers[path])
    return report_lib.QuantizationReport(tuple(reports))
