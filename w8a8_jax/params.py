"""`Fp8Params`: the parameters of one fp8 linear layer, one registered pytree for every part."""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, layout, platform, quantization, validation, weight_utils
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.scheme import Fp8Scheme

PARAM_NAMES = ("weight", "weight_scale", "input_scale", "bias")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Params:
    """An fp8 linear layer's parameters, as modules, sharding and checkpoints hold them.

    Invariant: `weight (N, K)` fp8 and `weight_scale` float32 `(1,)` (per tensor), `(N, 1)` (per
    channel) or `(ceil(N / bn), ceil(K / bk))` (per `(bn, bk)` block, the scheme's `block_size`),
    finite and > 0, with `quantization.dequantize_weight(weight, weight_scale) ≈` the float weight;
    `input_scale (1,)` float32 for the static activation scheme, else None; `bias (N,)` or None.
    Leading axes on every array (`weight (L, N, K)`, ...) make a stack of L layers (`nnx.scan`).

    Build it with `Fp8Params.create`, which checks the invariant once (the values where they are
    concrete); the plain constructor is what pytree transformations use and checks nothing.
    """

    weight: jax.Array
    weight_scale: jax.Array
    input_scale: jax.Array | None = None
    bias: jax.Array | None = None

    @classmethod
    def create(cls, weight, weight_scale, input_scale=None, bias=None, *, block_size=None) -> "Fp8Params":
        """Checks and normalizes the arrays: scales to float32, `()` to `(1,)`, `(N,)` to `(N, 1)`.

        `block_size (bn, bk)` says the weight is block-scaled: `weight_scale` must then be
        `(..., ceil(N / bn), ceil(K / bk))`.
        """
        weight = jnp.asarray(weight)
        if not dtypes.is_fp8(weight.dtype):
            raise TypeError(f"weight must be float8_e4m3fn or float8_e4m3fnuz, got {weight.dtype}")
        if weight.ndim < 2:
            raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
        lead, n = weight.shape[:-2], weight.shape[-2]
        weight_scale = validation.as_scale("weight_scale", weight_scale)
        if block_size is not None:
            block_size = scheme_lib.check_block_size(block_size)
            k = weight.shape[-1]
            blocks = (layout.num_blocks(n, block_size[0]), layout.num_blocks(k, block_size[1]))
            if tuple(weight_scale.shape) != (*lead, *blocks):
                raise ValueError(
                    f"weight_scale of {block_size[0]}x{block_size[1]}-block weights {tuple(weight.shape)} must be "
                    f"{(*lead, *blocks)}, got {tuple(weight_scale.shape)}"
                )
        elif not lead:
            validation.check_row_scale("weight_scale", weight_scale, n, "output channel")
            weight_scale = weight_scale.reshape(1) if weight_scale.size == 1 else weight_scale.reshape(n, 1)
        elif weight_scale.shape not in ((*lead, 1), (*lead, n, 1)):
            raise ValueError(
                f"weight_scale of stacked weights {tuple(weight.shape)} must be {(*lead, 1)} or {(*lead, n, 1)}, "
                f"got {tuple(weight_scale.shape)}"
            )
        validation.check_scale_values("weight_scale", weight_scale)
        if input_scale is not None:
            input_scale = validation.as_scale("input_scale", input_scale)
            if input_scale.size != math.prod(lead):
                raise ValueError(f"input_scale must have shape {(*lead, 1)}, got {tuple(input_scale.shape)}")
            input_scale = input_scale.reshape(*lead, 1)
            validation.check_scale_values("input_scale", input_scale)
        if bias is not None:
            bias = jnp.asarray(bias)
            if tuple(bias.shape) != (*lead, n):
                raise ValueError(f"bias must have shape {(*lead, n)}, got {tuple(bias.shape)}")
            validation.check_float_input("bias", bias)
        return cls(weight, weight_scale, input_scale, bias)

    @classmethod
    def from_float(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        scheme: Fp8Scheme,
        input_scale: jax.Array | None = None,
        shard_widths: Sequence[int] | None = None,
        name: str = "kernel",
    ) -> "Fp8Params":
        """Quantizes a float Flax kernel `(K, N)` (and bias `(N,)`, kept as it is) by `scheme`.

        `weight` and `weight_scale` come from `quantization.quantize_weight` of the `(N, K)`
        weight, in `scheme.fp8_dtype` (None: the platform's); `input_scale (1,)` is kept for the
        static scheme only (the calibrated scale, or 1.0 until calibration).

        `shard_widths` marks a fused projection (QKV, gate/up: the kernel's N split into shards):
        each shard is quantized per tensor with its own scale, as separately stored shards are,
        and the shards are fused as vLLM does (`weight_utils.fuse_fp8_shards`). Block weights are
        quantized block by block over the fused kernel (a block inside one shard is that shard's
        own block either way); the widths must still sum to N.

        A concrete kernel must be finite; `name` (e.g. the layer's path) names it in the errors.
        """
        fp8_dtype = platform.resolve_fp8_dtype(scheme.fp8_dtype)
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or 0 in kernel.shape:
            raise ValueError(f"{name} must be (K, N) with K, N >= 1, got shape {tuple(kernel.shape)}")
        validation.check_finite(name, kernel, ": weights must be finite to be quantized")
        weight = kernel.T
        if shard_widths is not None and (
            any(width < 1 for width in shard_widths) or sum(shard_widths) != weight.shape[0]
        ):
            raise ValueError(
                f"shard_widths must be >= 1 and sum to the kernel's N={weight.shape[0]}, got {list(shard_widths)}"
            )
        if shard_widths is None or scheme.is_block:
            codes, weight_scale = quantization.quantize_weight(
                weight, scheme.weight_granularity, fp8_dtype, block_size=scheme.block_size, name=name
            )
        else:
            splits = np.cumsum(shard_widths)[:-1]
            shards = [
                quantization.quantize_weight(shard, "per_tensor", fp8_dtype, name=name)
                for shard in jnp.split(weight, splits)
            ]
            codes, weight_scale = weight_utils.fuse_fp8_shards(shards, scheme.weight_granularity)
        if scheme.is_static:
            input_scale = jnp.ones((1,), jnp.float32) if input_scale is None else input_scale
        else:
            input_scale = None
        return cls.create(codes, weight_scale, input_scale, bias, block_size=scheme.block_size)

    @classmethod
    def from_dict(cls, params: Mapping[str, jax.Array], *, block_size=None) -> "Fp8Params":
        """From a mapping keyed as the modules name their parameters (a linen "params" entry);
        `block_size` for block-scaled weights."""
        unknown = set(params) - set(PARAM_NAMES)
        if unknown:
            raise ValueError(f"unexpected fp8 layer parameters {sorted(unknown)}; expected {PARAM_NAMES}")
        return cls.create(**params, block_size=block_size)

    def to_dict(self) -> dict[str, jax.Array]:
        """The parameters present, keyed as the modules name them (a linen "params" entry)."""
        return {name: getattr(self, name) for name in PARAM_NAMES if getattr(self, name) is not None}
