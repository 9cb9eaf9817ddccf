"""`Fp8Dense` for `flax.linen`: an fp8 W8A8 drop-in for `nn.Dense` over the shared `Fp8LinearOp` core."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from w8a8_jax import dense, quantization
from w8a8_jax import platform as platform_lib
from w8a8_jax import scheme as scheme_lib
from w8a8_jax.params import Fp8Params
from w8a8_jax.scheme import ActivationScheme, Fp8Scheme, WeightGranularity

default_kernel_init = nn.initializers.lecun_normal()


class Fp8Dense(nn.Module):
    """An fp8 W8A8 linear layer, `y = input_scale * weight_scale * (q(x) @ weight.T) + bias`.

    >>> import jax, jax.numpy as jnp
    >>> from w8a8_jax.linen import Fp8Dense
    >>> layer = Fp8Dense(64, weight_granularity="per_channel", activation_scheme="dynamic_per_token")
    >>> x = jnp.ones((4, 32), jnp.bfloat16)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> variables["params"]["weight"].shape, variables["params"]["weight"].dtype
    ((64, 32), dtype(float8_e4m3fn))
    >>> layer.apply(variables, x).shape
    (4, 64)

    Parameters (collection "params"): `weight (N, K)` fp8, `weight_scale (1,) | (N, 1) |
    (ceil(N / bn), ceil(K / bk))` float32 (per tensor, per channel, per block),
    `input_scale (1,)` float32 (static scheme only; 1.0 until calibrated), `bias (N,)`.
    `from_dense` quantizes an existing float kernel instead of a random one.

    Args:
      features: N, the number of output features.
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
        fp8_dtype and block_size (a field given as well must agree with it); after construction `scheme`
        always holds the layer's scheme and those fields match it.
    """

    features: int
    use_bias: bool = True
    weight_granularity: WeightGranularity = "per_channel"
    activation_scheme: ActivationScheme = "dynamic_per_token"
    scale_ub: float | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    fused: bool | None = None
    fp8_dtype: Any = None
    kernel_init: Any = default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    block_size: tuple[int, int] | None = None
    scheme: Fp8Scheme | None = None

    def __post_init__(self):
        scheme = scheme_lib.merge(
            self.scheme,
            weight_granularity=self.weight_granularity,
            activation_scheme=self.activation_scheme,
            scale_ub=self.scale_ub,
            fused=self.fused,
            fp8_dtype=self.fp8_dtype,
            block_size=self.block_size,
        )
        # Frozen dataclass fields, set once before linen finishes building the module.
        for name, value in {**scheme_lib.scheme_fields(scheme), "scheme": scheme}.items():
            object.__setattr__(self, name, value)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """`inputs (..., K)` -> `(..., features)` in `dtype` (default the input's)."""
        scheme = self.scheme
        in_features = inputs.shape[-1]
        quantized = {}

        def init_quantized(name):
            # weight and weight_scale come from one float kernel, so they share one draw.
            def init(rng):
                if not quantized:
                    kernel = self.kernel_init(rng, (in_features, self.features), self.param_dtype)
                    quantized["weight"], quantized["weight_scale"] = quantization.quantize_weight(
                        kernel.T,
                        scheme.weight_granularity,
                        platform_lib.resolve_fp8_dtype(scheme.fp8_dtype),
                        block_size=scheme.block_size,
                    )
                return quantized[name]

            return init

        weight = self.param("weight", init_quantized("weight"))
        weight_scale = self.param("weight_scale", init_quantized("weight_scale"))
        input_scale = (
            self.param("input_scale", nn.initializers.ones_init(), (1,), jnp.float32) if scheme.is_static else None
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        params = Fp8Params.create(weight, weight_scale, input_scale, bias, block_size=scheme.block_size)
        return dense.fp8_dense(inputs, params, scheme=scheme, out_dtype=self.dtype)

    @classmethod
    def from_dense(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        input_scale: jax.Array | None = None,
        **config,
    ) -> tuple["Fp8Dense", dict]:
        """Quantizes a float `nn.Dense` kernel `(K, N)` (and bias `(N,)`): returns `(module, variables)`.

        `config` takes the module's fields (scheme, or weight_granularity, activation_scheme,
        scale_ub, fused, fp8_dtype, block_size; dtype); `input_scale (1,)` is the calibrated scale for the
        static scheme (1.0 if None). `module.apply(variables, x)` then runs the fp8 layer.
        """
        module = cls(kernel.shape[1], use_bias=bias is not None, **config)
        params = Fp8Params.from_float(kernel, bias, scheme=module.scheme, input_scale=input_scale)
        return module, {"params": params.to_dict()}
