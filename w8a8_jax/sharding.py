"""Tensor-parallel fp8 layers: column-parallel (N split) and row-parallel (K split) with `shard_map`.

Column-parallel: every device holds all of `x (..., K)` and the rows `N / P` of `weight (N, K)`
(with their per-channel scales and bias); activation quantization sees the whole input, so each
output column is computed exactly as on one device. Row-parallel: every device holds `x[..., K/P]`
and `weight[:, K/P]`; a dynamic activation scale must come from the whole row, so the amax is
reduced with `pmax` across devices before quantizing (otherwise each shard would pick its own
scale), the float32 partial products are summed with `psum`, and scales and bias are applied once.
Codes and scales then equal the single-device layer's exactly; outputs differ only by float32
summation order.

Block-scaled layers split on block boundaries: column-parallel gives each device whole row blocks
of the weight (N / P a multiple of bn) with their scale rows; row-parallel whole k-blocks (K / P a
multiple of bk) with their scale columns, so every activation group lies in one shard and is
quantized there exactly as on one device (no `pmax`); the shards' float32 block sums are added with
`psum`, then bias and one rounding. A split that cuts a block is an error naming the sizes.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from w8a8_jax import dense, quantization, scaled_mm, validation
from w8a8_jax import nnx as fp8_nnx
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import Fp8Scheme

Mode = Literal["column", "row"]


def _params_and_scheme(layer, scheme: Fp8Scheme | None) -> tuple[Fp8Params, Fp8Scheme]:
    """An nnx `Fp8Dense`'s params and scheme, or `Fp8Params` (or a dict of its fields) with `scheme`."""
    if isinstance(layer, fp8_nnx.Fp8Dense):
        return layer.params, scheme or layer.scheme
    if scheme is None:
        raise ValueError("fp8 parameters need their scheme (an Fp8Scheme)")
    return (layer if isinstance(layer, Fp8Params) else Fp8Params.from_dict(layer, block_size=scheme.block_size)), scheme


def param_specs(params: Fp8Params, axis_name: str, mode: Mode, *, block_size=None) -> Fp8Params:
    """PartitionSpecs of an `Fp8Dense`'s parameters (an `Fp8Params` of specs): scales sharded with
    the axis they belong to.

    "column": `weight` and a per-channel `weight_scale` (`(N, 1)`) split on N, `bias` on N. "row":
    `weight` split on K; scales and bias (all per output channel or per tensor) replicated. With
    `block_size` (block weights) the block scale `(NB, KB)` splits with its weight: on NB
    ("column") or KB ("row").
    """
    if mode not in ("column", "row"):
        raise ValueError(f"mode must be 'column' or 'row', got {mode!r}")
    column = mode == "column"
    per_channel = not validation.is_per_tensor(params.weight_scale)
    if block_size is not None:
        scale_spec = PartitionSpec(axis_name, None) if column else PartitionSpec(None, axis_name)
    else:
        scale_spec = PartitionSpec(axis_name, None) if column and per_channel else PartitionSpec()
    return Fp8Params(
        weight=PartitionSpec(axis_name, None) if column else PartitionSpec(None, axis_name),
        weight_scale=scale_spec,
        input_scale=None if params.input_scale is None else PartitionSpec(),
        bias=None if params.bias is None else PartitionSpec(axis_name) if column else PartitionSpec(),
    )


def shard_params(layer, mesh: Mesh, axis_name: str, mode: Mode, *, scheme: Fp8Scheme | None = None) -> Fp8Params:
    """Places an `Fp8Dense`'s parameters (an nnx `Fp8Dense`, `Fp8Params` or a dict) on `mesh` per `param_specs`."""
    if scheme is None and not isinstance(layer, fp8_nnx.Fp8Dense):
        scale = layer.weight_scale if isinstance(layer, Fp8Params) else layer["weight_scale"]
        if scale.ndim == 2 and scale.shape[1] > 1:
            raise ValueError("block-scaled parameters need their scheme= (its block_size says how they may split)")
        scheme = Fp8Scheme()  # the specs of per-tensor and per-channel scales need no more
    params, scheme = _params_and_scheme(layer, scheme)
    _check_block_split(params, scheme, mesh, axis_name, mode)
    specs = param_specs(params, axis_name, mode, block_size=scheme.block_size)
    return jax.tree.map(lambda value, spec: jax.device_put(value, NamedSharding(mesh, spec)), params, specs)


def _check_block_split(params: Fp8Params, scheme: Fp8Scheme, mesh: Mesh, axis_name: str, mode: Mode) -> None:
    """A block layer's split must fall on block boundaries: N / P a multiple of bn ("column"),
    K / P a multiple of bk ("row")."""
    if not scheme.is_block:
        return
    devices = mesh.shape[axis_name]
    (n, k), (bn, bk) = params.weight.shape[-2:], scheme.block_size
    size, block, dim = (n, bn, "N") if mode == "column" else (k, bk, "K")
    if devices > 1 and (size % devices or (size // devices) % block):
        raise ValueError(
            f"{mode}-parallel block fp8: {dim}={size} over {devices} devices of '{axis_name}' gives shards of "
            f"{size / devices:g}, which must be a multiple of the weight block's {'bn' if dim == 'N' else 'bk'}={block}"
        )


def column_parallel(
    inputs: jax.Array, layer, *, mesh: Mesh, axis_name: str, scheme: Fp8Scheme | None = None, out_dtype=None
) -> jax.Array:
    """`inputs (..., K)` replicated -> `(..., N)` sharded on N over `axis_name`; each shard runs `fp8_dense`.

    `layer` is an nnx `Fp8Dense`, or `Fp8Params` with its `scheme`. N must divide by the axis size.
    """
    params, scheme = _params_and_scheme(layer, scheme)
    _check_block_split(params, scheme, mesh, axis_name, "column")
    specs = param_specs(params, axis_name, "column", block_size=scheme.block_size)
    lead = (None,) * (inputs.ndim - 1)

    def local(x, shard):
        return dense.fp8_dense(x, shard, scheme=scheme, out_dtype=out_dtype)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(PartitionSpec(), specs), out_specs=PartitionSpec(*lead, axis_name)
    )(inputs, params)


def _row_quantize(x, params: Fp8Params, scheme: Fp8Scheme, axis_name: str):
    """This shard's codes `(M, K/P)` and the activation scale of the whole row, `(1,)` or `(M, 1)`:
    the layer's formula with each amax reduced over the shards (`pmax`)."""
    scale_ub = None if scheme.scale_ub is None else jnp.full((1,), scheme.scale_ub, jnp.float32)
    return quantization.quantize_activation(
        x,
        scheme.activation_scheme,
        input_scale=params.input_scale,
        scale_ub=scale_ub,
        fp8_dtype=params.weight.dtype,
        reduce_amax=functools.partial(jax.lax.pmax, axis_name=axis_name),
    )


def row_parallel(
    inputs: jax.Array, layer, *, mesh: Mesh, axis_name: str, scheme: Fp8Scheme | None = None, out_dtype=None
) -> jax.Array:
    """`inputs (..., K)` sharded on K over `axis_name` -> `(..., N)` replicated.

    `out = input_scale * weight_scale * psum(q(x_shard) @ weight_shard.T) + bias`, the dynamic scales
    from the `pmax` of the shards' amax. K must divide by the axis size.
    """
    params, scheme = _params_and_scheme(layer, scheme)
    validation.check_float_input("inputs", inputs)
    _check_block_split(params, scheme, mesh, axis_name, "row")
    specs = param_specs(params, axis_name, "row", block_size=scheme.block_size)
    lead = (None,) * (inputs.ndim - 1)
    n = params.weight.shape[0]
    out_dtype = validation.check_out_dtype(inputs.dtype if out_dtype is None else out_dtype)

    def local_block(x, shard: Fp8Params):
        # Whole groups in this shard: the layer's own quantization; its float32 block sums, summed.
        partial = dense.fp8_dense(x, dataclasses.replace(shard, bias=None), scheme=scheme, out_dtype=jnp.float32)
        out = jax.lax.psum(partial, axis_name)
        if shard.bias is not None:
            out = out + shard.bias.astype(jnp.float32)
        return out.astype(out_dtype)

    def local(x, shard: Fp8Params):
        x2 = x.reshape(-1, x.shape[-1])
        codes, input_scale = _row_quantize(x2, shard, scheme, axis_name)
        one = jnp.ones((1,), jnp.float32)
        # Unit scales and float32 output: the raw accumulator of this shard's K slice.
        partial = scaled_mm.xla_per_tensor_w8a8_scaled_mm(codes, shard.weight, one, one, None, jnp.float32)
        acc = jax.lax.psum(partial, axis_name)
        out = scaled_mm.apply_scales(acc, input_scale, shard.weight_scale, shard.bias, out_dtype)
        return out.reshape(*x.shape[:-1], n)

    # The per-token scales derive from the pmax'd amax, so they (and the output) are the same on
    # every device, but they also pass through this shard's columns: the replication checker
    # cannot see that, hence check_vma=False.
    return jax.shard_map(
        local_block if scheme.is_block else local,
        mesh=mesh,
        in_specs=(PartitionSpec(*lead, axis_name), specs),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(inputs, params)
