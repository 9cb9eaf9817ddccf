"""Every public entry point refuses a concrete scale that is <= 0 or non-finite, naming the argument."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from w8a8_jax import (
    Fp8LinearOp,
    Fp8Params,
    Fp8Scheme,
    convert_to_channelwise,
    normalize_e4m3fn_to_e4m3fnuz,
    requantize_with_max_scale,
    scaled_fp8_quant,
    xla_channelwise_w8a8_scaled_mm,
    xla_per_tensor_w8a8_scaled_mm,
    xla_per_token_w8a8_scaled_mm,
)
from w8a8_jax.dense import fp8_dense
from w8a8_jax.kernels.gpu import quant as gpu_quant
from w8a8_jax.kernels.gpu import scaled_mm as gpu_mm
from w8a8_jax.kernels.tpu import fused_quant_scaled_mm, per_token_quant, w8a8_scaled_mm

M, K, N = 4, 256, 128
X = jnp.asarray(np.random.default_rng(0).normal(size=(M, K)), jnp.bfloat16)
CODES = X.astype(jnp.float8_e4m3fn)
WEIGHT = jnp.asarray(np.random.default_rng(1).normal(size=(N, K)), jnp.float32).astype(jnp.float8_e4m3fn)
ONE = jnp.ones((1,), jnp.float32)
OP = Fp8LinearOp(fused_supported=False)


def _op(name, bad):
    args = {"weight_scale": ONE}
    if name == "input_scale_ub":
        args |= {"input_scale_ub": bad, "use_per_token_if_dynamic": True}
    else:
        args[name] = bad
    return OP.apply(X, WEIGHT, **args)


def _gemm(fn, name, bad):
    scales = {"scale_a": ONE, "scale_b": ONE} | {name: bad}
    return fn(CODES, WEIGHT, scales["scale_a"], scales["scale_b"], None, jnp.bfloat16)


def _quant(name, bad):
    if name == "scale":
        return scaled_fp8_quant(X, bad)
    return scaled_fp8_quant(X, scale_ub=bad, use_per_token_if_dynamic=True)


def _params(name, bad):
    args = {"weight_scale": ONE, "input_scale": ONE} | {name: bad}
    return Fp8Params.create(WEIGHT, args["weight_scale"], args["input_scale"])


def _dense(name, bad):
    params = Fp8Params(WEIGHT, ONE if name != "weight_scale" else bad, bad if name == "input_scale" else ONE)
    return fp8_dense(X, params, scheme=Fp8Scheme("per_tensor", "static"), out_dtype=None)


def _tpu_fused(name, bad):
    args = {"weight_scale": ONE} | {name: bad}
    return fused_quant_scaled_mm(X, WEIGHT, args.pop("weight_scale"), **args, interpret=True)


ENTRY_POINTS = {
    "Fp8LinearOp.apply": (_op, ("weight_scale", "input_scale", "input_scale_ub")),
    "xla_per_tensor_w8a8_scaled_mm": (functools.partial(_gemm, xla_per_tensor_w8a8_scaled_mm), ("scale_a", "scale_b")),
    "xla_per_token_w8a8_scaled_mm": (functools.partial(_gemm, xla_per_token_w8a8_scaled_mm), ("scale_a", "scale_b")),
    "xla_channelwise_w8a8_scaled_mm": (
        functools.partial(_gemm, xla_channelwise_w8a8_scaled_mm),
        ("scale_a", "scale_b"),
    ),
    "scaled_fp8_quant": (_quant, ("scale", "scale_ub")),
    "Fp8Params.create": (_params, ("weight_scale", "input_scale")),
    "fp8_dense": (_dense, ("weight_scale", "input_scale")),
    "requantize_with_max_scale": (
        lambda name, bad: requantize_with_max_scale(WEIGHT, jnp.stack([ONE[0], bad.reshape(())]), [64, 64]),
        ("weight_scale",),
    ),
    "convert_to_channelwise": (
        lambda name, bad: convert_to_channelwise(jnp.stack([bad.reshape(()), ONE[0]]), [64, 64]),
        ("weight_scale",),
    ),
    "normalize_e4m3fn_to_e4m3fnuz": (
        lambda name, bad: normalize_e4m3fn_to_e4m3fnuz(
            WEIGHT, bad if name == "weight_scale" else ONE, bad if name == "input_scale" else None
        ),
        ("weight_scale", "input_scale"),
    ),
    "gpu per_token_quant": (
        lambda name, bad: gpu_quant.per_token_quant(X, bad, jnp.float8_e4m3fn, interpret=True),
        ("scale_ub",),
    ),
    "gpu scaled_mm": (functools.partial(_gemm, functools.partial(gpu_mm.scaled_mm, interpret=True)), ("scale_a",)),
    "tpu per_token_quant": (
        lambda name, bad: per_token_quant(X, bad, jnp.float8_e4m3fn, interpret=True),
        ("scale_ub",),
    ),
    "tpu w8a8_scaled_mm": (functools.partial(_gemm, functools.partial(w8a8_scaled_mm, interpret=True)), ("scale_b",)),
    "tpu fused_quant_scaled_mm": (_tpu_fused, ("weight_scale", "input_scale", "scale_ub")),
}
CASES = [(entry, name) for entry, (_, names) in ENTRY_POINTS.items() for name in names]


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
@pytest.mark.parametrize("entry, name", CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_refused_with_the_arguments_name(entry, name, bad):
    call, _ = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=rf"^{name} must be finite and > 0"):
        call(name, jnp.full((1,), bad, jnp.float32))
