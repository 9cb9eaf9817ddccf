"""Post-training quantization of linen models: matched `nn.Dense` calls run as `Fp8Dense` on converted params."""

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from w8a8_jax import dense, module_tree, platform
from w8a8_jax.convert import report as report_lib
from w8a8_jax.convert import rules as rules_lib
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import Fp8Scheme

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
    schemes: dict[str, Fp8Scheme]

    def _intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        scheme = self.schemes.get("/".join(module.path))
        if scheme is None:
            return next_fun(*args, **kwargs)
        params = module.variables["params"]
        inputs = _dense_inputs(args, kwargs)
        return dense.fp8_dense(
            inputs,
            Fp8Params.from_dict(params, block_size=scheme.block_size),
            scheme=scheme,
            out_dtype=_dense_out_dtype(module, inputs),
        )

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.model.apply(variables, *args, **kwargs)


def quantize_linen(
    model: nn.Module,
    variables: dict,
    rules: Sequence[rules_lib.QuantizationRule],
    calibration_data: Iterable[Any],
    *,
    fp8_dtype=None,
    report: bool = True,
) -> tuple[LinenFp8Model, dict, report_lib.QuantizationReport]:
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
    fp8_dtype = platform.resolve_fp8_dtype(fp8_dtype)
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
        rule = rules_lib.find_rule(rules, path)
        if rule is not None:
            targets[path] = (keys, rule, module_tree.tree_get(params, keys)["kernel"].ndim > 2)
    observed = {path: target for path, target in targets.items() if not target[2]}
    rules_lib.check_calibration(
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
                y_fp8 = dense.fp8_dense(inputs, layer, scheme=scheme, out_dtype=_dense_out_dtype(module, inputs))
                clip = report_lib.clip_bound(scheme, layer.input_scale, fp8_dtype)
            for name, value in report_lib.layer_stats(inputs, y_float, y_fp8, clip).items():
                module.sow(
                    _CALIBRATION,
                    name,
                    value,
                    init_fn=lambda: None,
                    reduce_fn=lambda total, x, name=name: (
                        x if total is None else report_lib.STAT_REDUCE[name](total, x)
                    ),
                )
            return y_float

        totals: dict[str, dict] = {}
        with nn.intercept_methods(observe):
            for index, args in enumerate(batches):
                _, state = model.apply(variables, *args, mutable=[_CALIBRATION])
                batch_stats = {}
                for path, (keys, _, _) in observed.items():
                    try:
                        batch_stats[path] = dict(module_tree.tree_get(state[_CALIBRATION], keys))
                    except KeyError:  # not called on this batch
                        continue
                    totals[path] = report_lib.merge_stats(totals.get(path), batch_stats[path])
                rules_lib.check_batch_stats(index, batch_stats)
        return totals

    static = any(rule.scheme.is_static for _, rule, _ in observed.values())
    amax = run_observed(None) if static else {}
    fp8_params = {}
    new_params = params
    for path, (keys, rule, _) in targets.items():
        scheme, to_params = rules_lib.params_maker(path, rule, amax, fp8_dtype)
        float_layer = module_tree.tree_get(params, keys)
        rules_lib.check_kernel(path, float_layer["kernel"])
        for _ in range(float_layer["kernel"].ndim - 2):
            to_params = jax.vmap(to_params)
        fp8_params[path] = to_params(float_layer["kernel"], float_layer.get("bias"))
        new_params = module_tree.tree_set(new_params, keys, fp8_params[path].to_dict())

    reports = []
    if report and observed:
        stats = run_observed(fp8_params)
        for path, (_, rule, _) in observed.items():
            if path in stats:
                reports.append(report_lib.layer_report(path, rule.scheme, fp8_params[path].input_scale, stats[path]))
    fp8_model = LinenFp8Model(model, {path: rule.scheme for path, (_, rule, _) in targets.items()})
    return fp8_model, {**variables, "params": new_params}, report_lib.QuantizationReport(tuple(reports))
