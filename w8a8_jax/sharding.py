"""Tensor-parallel fp8 layers: column-parallel (N split) and row-parallel (K split) with `shard_map`.

Column-parallel: every device holds all of `x (..., K)` and the rows `N / P` of `weight (N, K)`
(with their per-channel scales and bias); activation quantization sees the whole input, so each
output column is computed exactly as on one device. Row-parallel: every device holds `x[..., K/P]`
and `weight[:, K/P]`; a dynamic activation scale must come from the whole row, so the amax is
reduced with `pmax` across devices before quantizing (otherwise each shard would pick its own
scale), the float32 partial products are summed with `psum`, and scales and bias are applied once.
Codes and scales then equal the single-device layer's exactly; outputs differ only by float32
summation order.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from w8a8_jax import dense, quantization, scaled_mm, validation
from w8a8_jax import nnx as fp8_nnx

Mode = Literal["column", "row"]


def _params_and_scheme(layer, scheme: dense.Fp8Scheme | None) -> tuple[dict, dense.Fp8Scheme]:
    if isinstance(layer, fp8_nnx.Fp8Dense):
        params = {"weight": layer.weight[...], "weight_scale": layer.weight_scale[...]}
        if layer.input_scale is not None:
            params["input_scale"] = layer.input_scale[...]
        if layer.bias is not None:
            params["bias"] = layer.bias[...]
        return params, scheme or layer.scheme
    if scheme is None:
        raise ValueError("a parameter dict needs its scheme (dense.Fp8Scheme)")
    return dict(layer), scheme


def param_specs(params: dict, axis_name: str, mode: Mode) -> dict[str, PartitionSpec]:
    """PartitionSpecs of an `Fp8Dense`'s parameters: scales sharded with the axis they belong to.

    "column": `weight` and a per-channel `weight_scale` (`(N, 1)` or `(N,)`) split on N, `bias` on
    N. "row": `weight` split on K; scales and bias (all per output channel or per tensor) replicated.
    """
    if mode not in ("column", "row"):
        raise ValueError(f"mode must be 'column' or 'row', got {mode!r}")
    specs = {}
    for name, value in params.items():
        if name == "weight":
            specs[name] = PartitionSpec(axis_name, None) if mode == "column" else PartitionSpec(None, axis_name)
        elif mode == "column" and name == "bias":
            specs[name] = PartitionSpec(axis_name)
        elif mode == "column" and name == "weight_scale" and not validation.is_per_tensor(value):
            specs[name] = PartitionSpec(axis_name, *(None,) * (value.ndim - 1))
        else:
            specs[name] = PartitionSpec()
    return specs


def shard_params(layer, mesh: Mesh, axis_name: str, mode: Mode, *, scheme: dense.Fp8Scheme | None = None) -> dict:
    """Places an `Fp8Dense`'s parameters (a dict, or an nnx `Fp8Dense`) on `mesh` per `param_specs`."""
    params, _ = _params_and_scheme(layer, scheme or dense.Fp8Scheme())
    specs = param_specs(params, axis_name, mode)
    return {name: jax.device_put(value, NamedSharding(mesh, specs[name])) for name, value in params.items()}


def column_parallel(
    inputs: jax.Array, layer, *, mesh: Mesh, axis_name: str, scheme: dense.Fp8Scheme | None = None, out_dtype=None
) -> jax.Array:
    """`inputs (..., K)` replicated -> `(..., N)` sharded on N over `axis_name`; each shard runs `fp8_dense`.

    `layer` is an nnx `Fp8Dense` or a parameter dict with its `scheme`. N must divide by the axis size.
    """
    params, scheme = _params_and_scheme(layer, scheme)
    specs = param_specs(params, axis_name, "column")
    lead = (None,) * (inputs.ndim - 1)

    def local(x, shard):
        return dense.fp8_dense_params(x, shard, scheme=scheme, out_dtype=out_dtype)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(PartitionSpec(), specs), out_specs=PartitionSpec(*lead, axis_name)
    )(inputs, params)


def _row_quantize(x, params, scheme: dense.Fp8Scheme, axis_name: str):
    """This shard's codes `(M, K/P)` and the activation scale of the whole row, `(1,)` or `(M, 1)`."""
    fp8_dtype = params["weight"].dtype
    if scheme.is_static:
        input_scale = params["input_scale"].reshape(1)
        return quantization.quantize_per_tensor(x, input_scale[0], fp8_dtype), input_scale
    if scheme.activation_scheme == "dynamic_per_tensor":
        amax = jax.lax.pmax(jnp.max(jnp.abs(x)).astype(jnp.float32), axis_name)
        input_scale = quantization.dynamic_per_tensor_scale(amax.reshape(1), fp8_dtype).reshape(1)
        return quantization.quantize_per_tensor(x, input_scale[0], fp8_dtype), input_scale
    row_amax = jax.lax.pmax(jnp.max(jnp.abs(x), axis=1, keepdims=True).astype(jnp.float32), axis_name)
    scale_ub = None if scheme.scale_ub is None else jnp.full((1,), scheme.scale_ub, jnp.float32)
    return quantization.quantize_per_token(x, scale_ub, fp8_dtype, row_amax=row_amax)


def row_parallel(
    inputs: jax.Array, layer, *, mesh: Mesh, axis_name: str, scheme: dense.Fp8Scheme | None = None, out_dtype=None
) -> jax.Array:
    """`inputs (..., K)` sharded on K over `axis_name` -> `(..., N)` replicated.

    `out = input_scale * weight_scale * psum(q(x_shard) @ weight_shard.T) + bias`, the dynamic scales
    from the `pmax` of the shards' amax. K must divide by the axis size.
    """
    params, scheme = _params_and_scheme(layer, scheme)
    validation.check_float_input("inputs", inputs)
    specs = param_specs(params, axis_name, "row")
    lead = (None,) * (inputs.ndim - 1)
    n = params["weight"].shape[0]
    out_dtype = validation.check_out_dtype(inputs.dtype if out_dtype is None else out_dtype)

    def local(x, shard):
        x2 = x.reshape(-1, x.shape[-1])
        codes, input_scale = _row_quantize(x2, shard, scheme, axis_name)
        one = jnp.ones((1,), jnp.float32)
        # Unit scales and float32 output: the raw accumulator of this shard's K slice.
        partial = scaled_mm.xla_per_tensor_w8a8_scaled_mm(codes, shard["weight"], one, one, None, jnp.float32)
        acc = jax.lax.psum(partial, axis_name)
        out = scaled_mm.apply_scales(acc, input_scale, shard["weight_scale"], shard.get("bias"), out_dtype)
        return out.reshape(*x.shape[:-1], n)

    # The per-token scales derive from the pmax'd amax, so they (and the output) are the same on
    # every device, but they also pass through this shard's columns: the replication checker
    # cannot see that, hence check_vma=False.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(PartitionSpec(*lead, axis_name), specs), out_specs=PartitionSpec(), check_vma=False
    )(inputs, params)
