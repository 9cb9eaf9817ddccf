"""Fused projections of the Llama decoder: each layer's q/k/v projections as one `qkv_proj` and its
gate/up projections as one `gate_up_proj`, as vLLM serves them.

A decode step then runs 4 GEMMs a layer instead of 7, and an fp8 layer quantizes its input once
for the attention's projections and once for the MLP's, where it quantized it 3 and 2 times:
fewer launches, and no weight concatenated on the fly. Checkpoints keep the separate projections
(`checkpoint`, `hf_checkpoint`): fuse after loading, as a serving engine does.

The fused layer computes what its shards computed:
- float `nnx.Linear`: the kernels side by side along N;
- `Fp8Dense` per channel or per tensor: the codes stacked, every shard's scales as per-channel
  scales (`weight_utils.fuse_fp8_shards`, codes unchanged: exact), so per-tensor shards become one
  per-channel layer;
- `Fp8Dense` with block weights: codes and block scales stacked (`weight_utils.fuse_block_fp8_shards`),
  which needs every shard but the last to span whole blocks;
- a static activation scale: the shards' largest (they saw the same input; equal when calibrated
  together), as vLLM takes it.
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from w8a8_jax import nnx as fp8_nnx
from w8a8_jax import weight_utils
from w8a8_jax.models.llama import Llama
from w8a8_jax.nnx import Fp8Dense
from w8a8_jax.params import Fp8Params


def fuse_projections(model: Llama) -> Llama:
    """Fuses `model`'s projections in place (module docstring) and returns it.

    Layer i's `self_attn.q_proj`, `k_proj`, `v_proj` become `self_attn.qkv_proj` (N = heads *
    head_dim + 2 * kv heads * head_dim) and `mlp.gate_proj`, `up_proj` become `mlp.gate_up_proj`
    (N = 2 * intermediate); the layers they replace are removed. Every layer is fused before any is
    replaced: where one cannot be, the error leaves the model as it was.
    """
    fused = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):
            raise ValueError(f"layers/{i} is fused already")
        qkv_proj = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], name=f"layers/{i}/self_attn")
        fused.append((attn, mlp, qkv_proj, fuse_linears([mlp.gate_proj, mlp.up_proj], name=f"layers/{i}/mlp")))
    for attn, mlp, qkv_proj, gate_up_proj in fused:
        attn.qkv_proj, mlp.gate_up_proj = qkv_proj, gate_up_proj
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    return model


def fuse_linears(layers: Sequence[nnx.Linear | Fp8Dense], *, name: str) -> nnx.Linear | Fp8Dense:
    """One layer computing `layers`' outputs side by side along N, from the same input: all float
    `nnx.Linear` or all `Fp8Dense` of one scheme (module docstring). `name` names them in errors."""
    if all(isinstance(layer, nnx.Linear) for layer in layers):
        return _fuse_float(layers, name)
    if not all(isinstance(layer, Fp8Dense) for layer in layers):
        raise TypeError(f"{name}: fuse all-float or all-fp8 projections, got {[type(x).__name__ for x in layers]}")
    schemes = {layer.scheme for layer in layers}
    if len(schemes) > 1:
        raise ValueError(f"{name}: projections of different schemes cannot be fused: {sorted(map(str, schemes))}")
    (scheme,) = schemes
    params = [layer.params for layer in layers]
    if sum(p.bias is not None for p in params) not in (0, len(params)):
        raise ValueError(f"{name}: every projection or none must have a bias")
    shards = [(p.weight, p.weight_scale) for p in params]
    try:
        if scheme.is_block:
            weight, weight_scale = weight_utils.fuse_block_fp8_shards(shards, scheme.block_size)
        else:
            weight, weight_scale = weight_utils.fuse_fp8_shards(shards, "per_channel")
            scheme = dataclasses.replace(scheme, weight_granularity="per_channel")
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    input_scale = None
    if scheme.is_static:
        input_scale = jnp.max(jnp.stack([p.input_scale.reshape(()) for p in params])).reshape(1)
    bias = None if params[0].bias is None else jnp.concatenate([p.bias for p in params])
    fused = Fp8Params.create(weight, weight_scale, input_scale, bias, block_size=scheme.block_size)
    return fp8_nnx._stand_in(fused, scheme=scheme, layer=layers[0])


def _fuse_float(layers: Sequence[nnx.Linear], name: str) -> nnx.Linear:
    first = layers[0]
    if len({(layer.in_features, layer.dtype, layer.use_bias) for layer in layers}) > 1:
        raise ValueError(f"{name}: the projections differ in input width, dtype or bias")
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1)
    out_features = int(kernel.shape[1])
    fused = nnx.eval_shape(
        lambda: nnx.Linear(
            first.in_features,
            out_features,
            use_bias=first.use_bias,
            dtype=first.dtype,
            param_dtype=kernel.dtype,
            precision=first.precision,
            rngs=nnx.Rngs(0),
        )
    )
    fused.kernel = nnx.Param(kernel)
    if first.use_bias:
        fused.bias = nnx.Param(jnp.concatenate([layer.bias[...] for layer in layers]))
    return fused
