"""The layer call both `Fp8Dense` classes (and the converter, sharding, checkpoint report) make."""

import jax
import jax.numpy as jnp

from w8a8_jax.linear import Fp8LinearOp, W8A8BlockFp8LinearOp
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import Fp8Scheme


def fp8_linear_op(scheme: Fp8Scheme) -> Fp8LinearOp | W8A8BlockFp8LinearOp:
    """The op a layer quantized by `scheme` runs: `W8A8BlockFp8LinearOp` for block weights, else
    `Fp8LinearOp`."""
    if scheme.is_block:
        return W8A8BlockFp8LinearOp(scheme.block_size, (1, scheme.block_size[1]), fused_supported=scheme.fused)
    return Fp8LinearOp(fused_supported=scheme.fused, use_per_token_if_dynamic=scheme.per_token)


def fp8_dense(inputs: jax.Array, params: Fp8Params, *, scheme: Fp8Scheme, out_dtype=None) -> jax.Array:
    """`inputs (..., K)` -> `(..., N)`: `input_scale * weight_scale * (q(inputs) @ weight.T) + bias`
    (for block weights, the sum over k-blocks of `block_scaled_mm`).

    `Fp8LinearOp.apply` (or `W8A8BlockFp8LinearOp.apply`) configured by `scheme` on one layer's
    `params`; `params.input_scale` is used by the static scheme (which needs it) and ignored
    otherwise; out_dtype defaults to the input's dtype.
    """
    if scheme.is_block:
        return fp8_linear_op(scheme).apply(
            inputs, params.weight, params.weight_scale, bias=params.bias, out_dtype=out_dtype
        )
    if scheme.is_static and params.input_scale is None:
        raise ValueError("activation_scheme='static' needs an input_scale (calibrate the layer)")
    op = fp8_linear_op(scheme)
    scale_ub = None if scheme.scale_ub is None else jnp.full((1,), scheme.scale_ub, jnp.float32)
    return op.apply(
        inputs,
        params.weight,
        params.weight_scale,
        out_dtype=out_dtype,
        input_scale=params.input_scale if scheme.is_static else None,
        input_scale_ub=scale_ub,
        bias=params.bias,
    )
