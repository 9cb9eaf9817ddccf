"""`Fp8Dense` for `flax.nnx`: an fp8 W8A8 drop-in for `nnx.Linear` over the shared `Fp8LinearOp` core."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import dense
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import ActivationScheme, Fp8Scheme, WeightGranularity

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


class Fp8Dense(nnx.Module):
    """An fp8 W8A8 linear layer, `y = input_scale * weight_scale * (q(x) @ weight.T) + bias`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from w8a8_jax.nnx import Fp8Dense
    >>> layer = Fp8Dense(32, 64, weight_granularity="per_tensor", activation_scheme="dynamic_per_tensor",
    ...                  rngs=nnx.Rngs(0))
    >>> layer.weight[...].shape, layer.weight[...].dtype, layer.weight_scale[...].shape
    ((64, 32), dtype(float8_e4m3fn), (1,))
    >>> layer(jnp.ones((4, 32), jnp.bfloat16)).shape
    (4, 64)

    Parameters (`nnx.Param`): `weight (N, K)` fp8, `weight_scale (1,) | (N, 1) | (ceil(N / bn),
    ceil(K / bk))` float32 (per tensor, per channel, per block),
    `input_scale (1,)` float32 (static scheme only, else None; 1.0 until calibrated), `bias (N,)`
    (None without bias). `from_dense` quantizes an existing float kernel instead of a random one.

    Args:
      in_features: K, the number of input features.
      out_features: N, the number of output features.
      use_bias: whether to add a bias (default True).
      weight_granularity: "per_channel" (default), "per_tensor" or "block" weight scales.
      activation_scheme: "dynamic_per_token" (default), "dynamic_per_tensor" or "static"; block
        weights quantize activations per token group ("dynamic_per_token_group").
      scale_ub: upper bound on a token's amax (dynamic per-token only; default None).
      dtype: output dtype; None (default) keeps the input's.
      param_dtype: dtype of the float kernel drawn at init before quantization and of the bias
        (default float32).
      fused: allow the fused Pallas kernel; None (default) detects it.
      fp8_dtype: float8_e4m3fn or float8_e4m3fnuz; None (default) is the platform's.
      kernel_init: initializer of the float `(K, N)` kernel that is quantized at init.
      bias_init: initializer of the bias.
      block_size: `(bn, bk)` of block weights (default (128, 128)).
      scheme: an `Fp8Scheme` instead of weight_granularity, activation_scheme, scale_ub, fused,
        fp8_dtype and block_size (a keyword given as well must agree with it).
      rngs: the random streams (`params` draws the kernel).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        weight_granularity: WeightGranularity = "per_channel",
        activation_scheme: ActivationScheme = "dynamic_per_token",
        scale_ub: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        fused: bool | None = None,
        fp8_dtype: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_bias_init,
        block_size: tuple[int, int] | None = None,
        scheme: Fp8Scheme | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        scheme = scheme_lib.merge(
            scheme,
            weight_granularity=weight_granularity,
            activation_scheme=activation_scheme,
            scale_ub=scale_ub,
            fused=fused,
            fp8_dtype=fp8_dtype,
            block_size=block_size,
        )
        if rngs is None:
            raise TypeError("Fp8Dense needs rngs to draw its weight (or build it with Fp8Dense.from_dense)")
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        bias = bias_init(rngs.params(), (out_features,), param_dtype) if use_bias else None
        self._set(Fp8Params.from_float(kernel, bias, scheme=scheme), scheme, dtype)

    def _set(self, params: Fp8Params, scheme: Fp8Scheme, dtype) -> None:
        self.in_features = int(params.weight.shape[-1])
        self.out_features = int(params.weight.shape[-2])
        self.scheme = scheme
        self.dtype = dtype
        # With dtype None the output is `result_type(input, *_promote_with)`: () keeps the input's
        # dtype; a layer standing in for a float `nnx.Linear` promotes as that layer did.
        self._promote_with: tuple[np.dtype, ...] = ()
        self.weight = nnx.Param(params.weight)
        self.weight_scale = nnx.Param(params.weight_scale)
        self.input_scale = None if params.input_scale is None else nnx.Param(params.input_scale)
        self.bias = None if params.bias is None else nnx.Param(params.bias)

    @property
    def params(self) -> Fp8Params:
        """The layer's parameters as one `Fp8Params` (the arrays the `nnx.Param`s hold)."""
        return Fp8Params(
            self.weight[...],
            self.weight_scale[...],
            None if self.input_scale is None else self.input_scale[...],
            None if self.bias is None else self.bias[...],
        )

    @classmethod
    def from_dense(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        input_scale: jax.Array | None = None,
        weight_granularity: WeightGranularity = "per_channel",
        activation_scheme: ActivationScheme = "dynamic_per_token",
        scale_ub: float | None = None,
        dtype: Any = None,
        fused: bool | None = None,
        fp8_dtype: Any = None,
        block_size: tuple[int, int] | None = None,
        scheme: Fp8Scheme | None = None,
    ) -> "Fp8Dense":
        """Quantizes a float `nnx.Linear` kernel `(K, N)` (and bias `(N,)`) into an `Fp8Dense`.

        `input_scale (1,)` is the calibrated scale for the static scheme (1.0 if None).
        """
        scheme = scheme_lib.merge(
            scheme,
            weight_granularity=weight_granularity,
            activation_scheme=activation_scheme,
            scale_ub=scale_ub,
            fused=fused,
            fp8_dtype=fp8_dtype,
            block_size=block_size,
        )
        params = Fp8Params.from_float(kernel, bias, scheme=scheme, input_scale=input_scale)
        return cls.from_fp8(params, scheme=scheme, dtype=dtype)

    @classmethod
    def from_fp8(cls, params: Fp8Params | dict, *, scheme: Fp8Scheme, dtype: Any = None) -> "Fp8Dense":
        """Wraps already-quantized parameters (an `Fp8Params`, or a dict of its fields) in an `Fp8Dense`.

        Parameters with leading axes (`weight (L, N, K)`, `weight_scale (L, 1) | (L, N, 1)`, ...: a
        stack of L layers, as `nnx.vmap` builds it) make a stacked layer to run under `nnx.scan`.
        """
        if not isinstance(params, Fp8Params):
            params = Fp8Params.from_dict(params, block_size=scheme.block_size)
        out_features, in_features = params.weight.shape[-2:]
        # Build the module abstractly (no random draw, no quantization), then put the arrays in.
        layer = nnx.eval_shape(
            lambda: cls(in_features, out_features, use_bias=params.bias is not None, scheme=scheme, rngs=nnx.Rngs(0))
        )
        layer._set(params, scheme, dtype)
        return layer

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """`inputs (..., K)` -> `(..., out_features)` in `dtype` (default the input's)."""
        out_dtype = self.dtype
        if out_dtype is None and self._promote_with:
            out_dtype = jnp.result_type(inputs.dtype, *self._promote_with)
        return dense.fp8_dense(inputs, self.params, scheme=self.scheme, out_dtype=out_dtype)


def _stand_in(params: Fp8Params, *, scheme: Fp8Scheme, layer: nnx.Linear | Fp8Dense) -> Fp8Dense:
    """The `Fp8Dense` on `params` that replaces `layer` (a float `nnx.Linear` or an `Fp8Dense`).

    It returns what `layer` returned for the same input dtype: `layer.dtype` if set, else for an
    `nnx.Linear` the promotion of the input with its kernel and bias (`result_type(input, kernel,
    bias)`, as `nnx.Linear` computes), for an `Fp8Dense` the same rule as `layer`'s.
    """
    fp8_layer = Fp8Dense.from_fp8(params, scheme=scheme, dtype=layer.dtype)
    if isinstance(layer, Fp8Dense):
        fp8_layer._promote_with = layer._promote_with
    elif layer.dtype is None:
        float_params = (layer.kernel, layer.bias)
        fp8_layer._promote_with = tuple(np.dtype(p.get_value().dtype) for p in float_params if p is not None)
    return fp8_layer
