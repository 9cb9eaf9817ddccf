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

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import dense, dtypes
from w8a8_jax import nnx as fp8_nnx


@dataclasses.dataclass(frozen=True)
class QuantizationRule:
    """Which layers to convert (a regex on the module path) and how.

    Args:
      module_path: regex that must match the whole "/"-joined path (default ".*", every layer).
      weight_granularity: "per_channel" (default) or "per_tensor".
      activation_scheme: "dynamic_per_token" (default), "dynamic_per_tensor" or "static".
      scale_ub: upper bound on a token's amax (dynamic per-token only).
      fused: allow the fused Pallas kernel; None detects it.
      shard_widths: for a fused projection, the output widths of its shards (QKV: `(q, k, v)`);
        each shard gets its own scale and they are fused as vLLM does (see `dense.fuse_fp8_shards`).
      quantize: False keeps matched layers float (e.g. an `lm_head` rule before a catch-all).
    """

    module_path: str = ".*"
    weight_granularity: dense.WeightGranularity = "per_channel"
    activation_scheme: dense.ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    fused: bool | None = None
    shard_widths: tuple[int, ...] | None = None
    quantize: bool = True

    @property
    def scheme(self) -> dense.Fp8Scheme:
        return dense.Fp8Scheme(self.weight_granularity, self.activation_scheme, self.scale_ub, self.fused)


def find_rule(rules: Sequence[QuantizationRule], path: str) -> QuantizationRule | None:
    """The first rule whose `module_path` fully matches `path`, or None (also for `quantize=False`)."""
    for rule in rules:
        if re.fullmatch(rule.module_path, path):
            return rule if rule.quantize else None
    return None


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
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    __str__ = table


# Per-layer statistics, accumulated over batches; each is merged with `_STAT_REDUCE`.
_STAT_REDUCE = {
    "input_amax": jnp.maximum,
    "saturated": jnp.add,
    "count": jnp.add,
    "signal": jnp.add,
    "noise": jnp.add,
    "max_error": jnp.maximum,
    "max_ref": jnp.maximum,
}


def _clip_bound(scheme: dense.Fp8Scheme, input_scale, fp8_dtype) -> float:
    if scheme.is_static:
        return float(np.asarray(input_scale).reshape(())) * dtypes.fp8_max(fp8_dtype)
    if scheme.scale_ub is not None:
        return scheme.scale_ub
    return math.inf


def _layer_stats(inputs, y_float, y_fp8, clip: float) -> dict[str, jax.Array]:
    """Float32 sums and maxima of one batch, for `_STAT_REDUCE` to merge."""
    abs_x = jnp.abs(inputs.astype(jnp.float32))
    y_float = y_float.astype(jnp.float32)
    error = y_fp8.astype(jnp.float32) - y_float
    return {
        "input_amax": jnp.max(abs_x),
        "saturated": jnp.sum(abs_x > clip).astype(jnp.float32),
        "count": jnp.float32(abs_x.size),
        "signal": jnp.sum(jnp.square(y_float)),
        "noise": jnp.sum(jnp.square(error)),
        "max_error": jnp.max(jnp.abs(error)),
        "max_ref": jnp.max(jnp.abs(y_float)),
    }


def _merge(total: dict | None, stats: dict) -> dict:
    if total is None:
        return stats
    return {name: _STAT_REDUCE[name](total[name], stats[name]) for name in stats}


def _layer_report(path: str, scheme: dense.Fp8Scheme, input_scale, stats: dict) -> LayerReport:
    stats = {name: float(value) for name, value in stats.items()}
    noise = stats["noise"]
    return LayerReport(
        path=path,
        weight_granularity=scheme.weight_granularity,
        activation_scheme=scheme.activation_scheme,
        input_amax=stats["input_amax"],
        input_scale=None if input_scale is None else float(np.asarray(input_scale).reshape(())),
        saturated_fraction=stats["saturated"] / max(stats["count"], 1.0),
        sqnr_db=math.inf if noise == 0 else 10 * math.log10(stats["signal"] / noise) if stats["signal"] else -math.inf,
        max_rel_error=stats["max_error"] / stats["max_ref"] if stats["max_ref"] else stats["max_error"],
    )


def _params_maker(path: str, rule: QuantizationRule, amax: dict, fp8_dtype):
    """The layer's scheme and `kernel, bias -> fp8 params` for it, with its calibrated input scale."""
    scheme = rule.scheme
    input_scale = _static_input_scale(path, amax.get(path), fp8_dtype) if scheme.is_static else None
    return scheme, functools.partial(
        dense.fp8_params, scheme=scheme, input_scale=input_scale, fp8_dtype=fp8_dtype, shard_widths=rule.shard_widths
    )


def _static_input_scale(path: str, stats: dict | None, fp8_dtype) -> jax.Array:
    """The calibrated `input_scale (1,)` of static layer `path` from its merged stats."""
    if stats is None:
        raise ValueError(f"static layer {path!r} was not called on calibration_data")
    return dense.static_input_scale(stats["input_amax"], fp8_dtype)


def _check_calibration(static_paths: list[str], stacked_static: list[str], batches: list) -> None:
    if stacked_static:
        raise NotImplementedError(
            f"static calibration of stacked (scanned) layers is not supported: {stacked_static}; "
            "use a dynamic activation scheme for them"
        )
    if static_paths and not batches:
        raise ValueError(f"static layers {static_paths} need calibration_data to set their input_scale")


# ----------------------------------------------------------------------------------------------
# nnx


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
        self.stats.set_value(_merge(self.stats.get_value(), _layer_stats(inputs, y_float, y_fp8, self.clip)))
        return y_float


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _run_observed(model, targets, fp8_layers, batches, forward, fp8_dtype) -> dict[str, dict]:
    """Runs `forward` over `batches` with observers in place of the targets; their merged stats."""
    observers = {}
    for path, parent, key, linear, rule in targets:
        fp8_layer = fp8_layers.get(path)
        clip = math.inf
        if fp8_layer is not None:
            input_scale = None if fp8_layer.input_scale is None else fp8_layer.input_scale[...]
            clip = _clip_bound(rule.scheme, input_scale, fp8_dtype)
        observers[path] = _Observer(linear, fp8_layer, clip)
        _set_child(parent, key, observers[path])
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for path, parent, key, linear, rule in targets:
            _set_child(parent, key, linear)
    return {path: observer.stats.get_value() for path, observer in observers.items()}


def quantize_nnx(
    model: nnx.Module,
    rules: Sequence[QuantizationRule],
    *,
    calibration_data: Iterable[Any] = (),
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    fp8_dtype=None,
) -> QuantizationReport:
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
    fp8_dtype = dense.resolve_fp8_dtype(fp8_dtype)
    batches = list(calibration_data)
    targets = []
    for path_keys, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            path = "/".join(str(key) for key in path_keys)
            rule = find_rule(rules, path)
            if rule is not None:
                parent = model
                for key in path_keys[:-1]:
                    parent = _child(parent, key)
                targets.append((path, parent, path_keys[-1], node, rule))
    stacked = {path for path, _, _, linear, _ in targets if linear.kernel[...].ndim > 2}
    observed = [target for target in targets if target[0] not in stacked]
    _check_calibration(
        [t[0] for t in observed if t[4].scheme.is_static],
        [t[0] for t in targets if t[0] in stacked and t[4].scheme.is_static],
        batches,
    )

    amax = _run_observed(model, observed, {}, batches, forward, fp8_dtype) if batches else {}
    fp8_layers = {}
    for path, _, _, linear, rule in targets:
        scheme, to_params = _params_maker(path, rule, amax, fp8_dtype)
        kernel = linear.kernel[...]
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
                _layer_report(
                    path, rule.scheme, None if layer.input_scale is None else layer.input_scale[...], stats[path]
                )
            )
    for path, parent, key, _, _ in targets:
        _set_child(parent, key, fp8_layers[path])
    return QuantizationReport(tuple(reports))


# ----------------------------------------------------------------------------------------------
# linen

_CALIBRATION = "fp8_calibration"


def _as_args(batch) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def _dense_inputs(args: tuple, kwargs: dict) -> jax.Array:
    """The input of an intercepted `nn.Dense.__call__(inputs)`, passed by position or by name."""
    return args[0] if args else kwargs["inputs"]


def _dense_out_dtype(module: nn.Dense, inputs: jax.Array):
    """The dtype a float `nn.Dense` returns for `inputs`: its `dtype`, else `result_type(inputs, param_dtype)`."""
    return module.dtype if module.dtype is not None else jnp.result_type(inputs.dtype, module.param_dtype)


@dataclasses.dataclass(frozen=True)
class LinenFp8Model:
    """A linen model whose `nn.Dense` calls at `schemes`' paths run as `Fp8Dense` on converted params.

    `apply(variables, *args, **kwargs)` is the model's own `apply` with those calls intercepted; it
    works under `jax.jit`, `jax.vmap` and inside `nn.scan`. Each intercepted call returns the dtype
    the float `nn.Dense` would have returned (its `dtype`, else `result_type(input, param_dtype)`).
    """

    model: nn.Module
    schemes: dict[str, dense.Fp8Scheme]

    def _intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        scheme = self.schemes.get("/".join(module.path))
        if scheme is None:
            return next_fun(*args, **kwargs)
        params = module.variables["params"]
        inputs = _dense_inputs(args, kwargs)
        return dense.fp8_dense_params(inputs, params, scheme=scheme, out_dtype=_dense_out_dtype(module, inputs))

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.model.apply(variables, *args, **kwargs)


def _tree_get(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def _tree_set(tree: dict, keys, value) -> dict:
    """A copy of the nested dict `tree` with `value` at `keys` (the rest shared)."""
    if not keys:
        return value
    tree = dict(tree)
    tree[keys[0]] = _tree_set(tree[keys[0]], keys[1:], value)
    return tree


def quantize_linen(
    model: nn.Module,
    variables: dict,
    rules: Sequence[QuantizationRule],
    calibration_data: Iterable[Any],
    *,
    fp8_dtype=None,
    report: bool = True,
) -> tuple[LinenFp8Model, dict, QuantizationReport]:
    """Converts the `nn.Dense` layers of a linen model that `rules` match to fp8.

    Args:
      model: the float linen module.
      variables: its variables (`{"params": ...}`); not modified.
      rules: tried in order; the first match on the "/"-joined module path decides.
      calibration_data: batches (an array, or a tuple of `apply` arguments); at least one, which
        finds the `nn.Dense` layers; static layers take `input_scale` from all of them.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz; default the platform's.
      report: compare each fp8 layer with its float one on the batches (one more pass).

    Returns:
      `(fp8_model, fp8_variables, report)`: run with `fp8_model.apply(fp8_variables, *args)`. A
      converted layer's `{"kernel", "bias"}` become `Fp8Dense`'s parameters; stacked layers
      (`nn.scan`) are quantized slice by slice (dynamic schemes only; they are not observed).
    """
    fp8_dtype = dense.resolve_fp8_dtype(fp8_dtype)
    batches = [_as_args(batch) for batch in calibration_data]
    if not batches:
        raise ValueError("quantize_linen needs at least one calibration batch to find the Dense layers")
    dense_paths: dict[str, tuple[str, ...]] = {}

    def find_dense(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            dense_paths["/".join(context.module.path)] = tuple(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(find_dense):
        jax.eval_shape(lambda v, args: model.apply(v, *args), variables, batches[0])

    params = variables["params"]
    targets = {}  # path -> (keys, rule, stacked)
    for path, keys in dense_paths.items():
        rule = find_rule(rules, path)
        if rule is not None:
            targets[path] = (keys, rule, _tree_get(params, keys)["kernel"].ndim > 2)
    observed = {path: target for path, target in targets.items() if not target[2]}
    _check_calibration(
        [p for p, (_, r, _) in observed.items() if r.scheme.is_static],
        [p for p, (_, r, s) in targets.items() if s and r.scheme.is_static],
        batches,
    )

    def run_observed(fp8_params: dict | None) -> dict[str, dict]:
        def observe(next_fun, args, kwargs, context):
            module = context.module
            path = "/".join(module.path) if isinstance(module, nn.Dense) else None
            if context.method_name != "__call__" or path not in observed:
                return next_fun(*args, **kwargs)
            inputs = _dense_inputs(args, kwargs)
            y_float = next_fun(*args, **kwargs)
            y_fp8, clip = y_float, math.inf
            if fp8_params is not None:
                layer = fp8_params[path]
                scheme = observed[path][1].scheme
                y_fp8 = dense.fp8_dense_params(inputs, layer, scheme=scheme, out_dtype=_dense_out_dtype(module, inputs))
                clip = _clip_bound(scheme, layer.get("input_scale"), fp8_dtype)
            for name, value in _layer_stats(inputs, y_float, y_fp8, clip).items():
                module.sow(
                    _CALIBRATION,
                    name,
                    value,
                    init_fn=lambda: None,
                    reduce_fn=lambda total, x, name=name: x if total is None else _STAT_REDUCE[name](total, x),
                )
            return y_float

        totals: dict[str, dict] = {}
        with nn.intercept_methods(observe):
            for args in batches:
                _, state = model.apply(variables, *args, mutable=[_CALIBRATION])
                for path, (keys, _, _) in observed.items():
                    try:
                        stats = dict(_tree_get(state[_CALIBRATION], keys))
                    except KeyError:  # not called on this batch
                        continue
                    totals[path] = _merge(totals.get(path), stats)
        return totals

    static = any(rule.scheme.is_static for _, rule, _ in observed.values())
    amax = run_observed(None) if static else {}
    fp8_params = {}
    new_params = params
    for path, (keys, rule, _) in targets.items():
        scheme, to_params = _params_maker(path, rule, amax, fp8_dtype)
        float_layer = _tree_get(params, keys)
        for _ in range(float_layer["kernel"].ndim - 2):
            to_params = jax.vmap(to_params)
        fp8_params[path] = to_params(float_layer["kernel"], float_layer.get("bias"))
        new_params = _tree_set(new_params, keys, fp8_params[path])

    reports = []
    if report and observed:
        stats = run_observed(fp8_params)
        for path, (_, rule, _) in observed.items():
            if path in stats:
                reports.append(_layer_report(path, rule.scheme, fp8_params[path].get("input_scale"), stats[path]))
    fp8_model = LinenFp8Model(model, {path: rule.scheme for path, (_, rule, _) in targets.items()})
    return fp8_model, {**variables, "params": new_params}, QuantizationReport(tuple(reports))
