"""The dispatch plan: what it decides on every branch, that what it names is what runs, and that a
registry change takes effect on the next call."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from w8a8_jax import Fp8LinearOp, Fp8Scheme, dispatch, linear, platform, quantization, scaled_mm
from w8a8_jax.platform import FusedKernel

K, N = 64, 32


class Recorder:
    """A fake fused kernel whose every function records its name, and spies on the XLA paths."""

    def __init__(self, monkeypatch, **capabilities):
        self.calls: list[str] = []
        per_token_quant = quantization.quantize_per_token
        xla_rowwise = scaled_mm.xla_per_token_w8a8_scaled_mm

        def recorded(name, fn):
            def wrapped(*args, **kwargs):
                self.calls.append(name)
                return fn(*args, **kwargs)

            wrapped.__name__ = name
            return wrapped

        def quant_scaled_mm(x, weight, weight_scale, *, input_scale, scale_ub, bias, out_dtype):
            if input_scale is None:
                q, s = per_token_quant(x, scale_ub, weight.dtype)
            else:
                q, s = quantization.quantize_activation(
                    x, "static", input_scale=input_scale, scale_ub=None, fp8_dtype=weight.dtype
                )
            return xla_rowwise(q, weight, s, weight_scale, bias, out_dtype)

        self.kernel = FusedKernel(
            scaled_mm=recorded("fused_w8a8_scaled_mm", xla_rowwise),
            supports_device=lambda device: True,
            per_token_quant=recorded("kernel.per_token_quant", per_token_quant),
            quant_scaled_mm=recorded("kernel.quant_scaled_mm", quant_scaled_mm),
            **capabilities,
        )
        for name in dispatch.XLA_QUANTIZERS.values():
            monkeypatch.setattr(quantization, name, recorded(name, getattr(quantization, name)))
        for name, path in list(scaled_mm._XLA_PATHS.items()):
            monkeypatch.setitem(scaled_mm._XLA_PATHS, name, recorded(name, path))


def layer(key, per_channel: bool):
    """An fp8 weight (N, K) with scales quantized from a float weight, and a bias."""
    k1, k2 = jax.random.split(key)
    w = np.asarray(jax.random.normal(k1, (N, K)), np.float32) * 0.05
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max().reshape(1)
    weight_scale = (amax / 448).astype(np.float32)
    weight = reference.fp8_cast(w / weight_scale.reshape(-1, 1), jnp.float8_e4m3fn)
    return jnp.asarray(weight), jnp.asarray(weight_scale), jax.random.normal(k2, (N,))


# (activation, per-channel weights, fp8 input, kernel capabilities) -> (quantizer, gemm)
BRANCHES = [
    ("dynamic_per_token", True, False, {}, "kernel.quant_scaled_mm", "kernel.quant_scaled_mm"),
    ("static", True, False, {}, "kernel.quant_scaled_mm", "kernel.quant_scaled_mm"),
    ("dynamic_per_tensor", True, False, {}, "quantize_dynamic_per_tensor", "fused_w8a8_scaled_mm"),
    (
        "dynamic_per_token",
        True,
        False,
        {"quant_scaled_mm_supports": lambda *a: False},
        "kernel.per_token_quant",
        "fused_w8a8_scaled_mm",
    ),
    (
        "static",
        False,
        False,
        {"quant_scaled_mm_supports": lambda *a: False},
        "quantize_per_tensor",
        "fused_w8a8_scaled_mm",
    ),
    ("static", True, True, {}, None, "fused_w8a8_scaled_mm"),
    # Measured slower: XLA's GEMM of the same math, the quant kernel still used.
    (
        "dynamic_per_token",
        True,
        False,
        {"faster_than_xla": lambda m, k, n: False},
        "kernel.per_token_quant",
        "xla_per_token_w8a8_scaled_mm",
    ),
    (
        "static",
        False,
        False,
        {"faster_than_xla": lambda m, k, n: False},
        "quantize_per_tensor",
        "xla_per_tensor_w8a8_scaled_mm",
    ),
    # Shape or dtype not taken: the tree without the fused branch.
    (
        "dynamic_per_token",
        True,
        False,
        {"supports_shape": lambda k, n: False},
        "kernel.per_token_quant",
        "xla_per_token_w8a8_scaled_mm",
    ),
    (
        "static",
        True,
        False,
        {"supports_shape": lambda k, n: False},
        "quantize_per_tensor",
        "xla_channelwise_w8a8_scaled_mm",
    ),
    (
        "dynamic_per_tensor",
        False,
        False,
        {"fp8_dtypes": ()},
        "quantize_dynamic_per_tensor",
        "xla_per_tensor_w8a8_scaled_mm",
    ),
    (
        "dynamic_per_token",
        True,
        False,
        {"fp8_dtypes": (), "supports_shape": lambda k, n: False},
        "quantize_per_token",
        "xla_per_token_w8a8_scaled_mm",
    ),
    (
        "dynamic_per_token",
        True,
        False,
        {"per_token_quant_supports": lambda *a: False, "supports_shape": lambda k, n: False},
        "quantize_per_token",
        "xla_per_token_w8a8_scaled_mm",
    ),
]


def call_args(key, activation, per_channel, fp8_input):
    weight, weight_scale, bias = layer(key, per_channel)
    x = (jax.random.normal(jax.random.fold_in(key, 1), (5, K)) * 2).astype(jnp.bfloat16)
    input_scale = jnp.array([0.01], jnp.float32) if activation == "static" else None
    if fp8_input:
        x = jnp.asarray(reference.quant_static(x, 0.01))
    return x, weight, weight_scale, input_scale, bias


def expected_output(x, weight, weight_scale, input_scale, bias, activation):
    if jnp.dtype(x.dtype) == jnp.float8_e4m3fn:
        codes, scale = np.asarray(x), np.asarray(input_scale)
    elif activation == "static":
        codes, scale = reference.quant_static(x, 0.01), np.asarray(input_scale)
    elif activation == "dynamic_per_tensor":
        codes, scale = reference.quant_dynamic_per_tensor(x)
    else:
        codes, scale = reference.quant_dynamic_per_token(x)
    return reference.scaled_mm(codes, weight, scale, weight_scale, bias)


@pytest.mark.parametrize("activation, per_channel, fp8_input, capabilities, quantizer, gemm", BRANCHES)
def test_plan_is_what_runs(monkeypatch, key, activation, per_channel, fp8_input, capabilities, quantizer, gemm):
    """Every branch: the plan's names, the functions that ran (in order), and the float64 result."""
    recorder = Recorder(monkeypatch, **capabilities)
    x, weight, weight_scale, input_scale, bias = call_args(key, activation, per_channel, fp8_input)
    op = Fp8LinearOp(use_per_token_if_dynamic=activation == "dynamic_per_token")
    with platform.override(fused_kernel=recorder.kernel):
        plan = op.plan(x, weight, weight_scale, input_scale, bias=bias)
        assert (plan.quantizer, plan.gemm) == (quantizer, gemm), plan.reason
        linear._run_plan.clear_cache()  # so the spies run at trace time
        out = op.apply(x, weight, weight_scale, input_scale=input_scale, bias=bias)
    ran = [name for name in (quantizer, gemm) if name is not None]
    assert [name for name in recorder.calls if name != "quantize_per_tensor" or quantizer == name] == list(
        dict.fromkeys(ran)
    ), recorder.calls
    reference.assert_gemm_close(
        out, expected_output(x, weight, weight_scale, input_scale, bias, activation), K, out.dtype
    )


@pytest.mark.parametrize("activation", ["static", "dynamic_per_tensor", "dynamic_per_token"])
def test_fused_supported_false_calls_no_kernel(monkeypatch, key, activation):
    recorder = Recorder(monkeypatch)
    x, weight, weight_scale, input_scale, bias = call_args(key, activation, True, False)
    op = Fp8LinearOp(fused_supported=False, use_per_token_if_dynamic=activation == "dynamic_per_token")
    with platform.override(fused_kernel=recorder.kernel):
        plan = op.plan(x, weight, weight_scale, input_scale, bias=bias)
        linear._run_plan.clear_cache()
        op.apply(x, weight, weight_scale, input_scale=input_scale, bias=bias)
    assert plan.kernel is None and not plan.gemm.startswith(("fused", "kernel"))
    assert not [name for name in recorder.calls if name.startswith("kernel.")], recorder.calls
    assert recorder.calls[-1] == plan.gemm


def test_registry_change_takes_effect_on_the_next_call(monkeypatch, key):
    """Same op, same shapes, no cache clearing: each call runs what the platform offers now."""
    recorder = Recorder(monkeypatch)
    x, weight, weight_scale, _, bias = call_args(key, "dynamic_per_token", True, False)
    op = Fp8LinearOp(use_per_token_if_dynamic=True)
    outputs = []
    for kernel, expect_kernel in [(None, False), (recorder.kernel, True), (None, False)]:
        recorder.calls.clear()
        monkeypatch.setitem(platform._registry, jax.default_backend(), kernel)
        outputs.append(op.apply(x, weight, weight_scale, bias=bias))
        assert ("kernel.quant_scaled_mm" in recorder.calls) == expect_kernel, recorder.calls
    ref = expected_output(x, weight, weight_scale, None, bias, "dynamic_per_token")
    for out in outputs:
        reference.assert_gemm_close(out, ref, K, out.dtype)


def test_plans_that_run_the_same_code_share_one_program(key):
    """The reason is not part of the cache key; the plan is."""
    a = dispatch.Plan("quantize_per_token", "xla_per_token_w8a8_scaled_mm", reason="one")
    b = dispatch.Plan("quantize_per_token", "xla_per_token_w8a8_scaled_mm", reason="other")
    assert a == b and hash(a) == hash(b)
    assert a != dataclasses.replace(a, gemm="xla_channelwise_w8a8_scaled_mm")


def test_gemm_path_tells_the_truth(monkeypatch, key):
    recorder = Recorder(
        monkeypatch, faster_than_xla=lambda m, k, n: m >= 128, quant_scaled_mm_supports=lambda *a: False
    )
    weight, weight_scale, _ = layer(key, per_channel=True)
    op = Fp8LinearOp(use_per_token_if_dynamic=True)
    with platform.override(fused_kernel=recorder.kernel):
        with pytest.raises(ValueError, match="depends on M: pass input="):
            op.gemm_path(weight, weight_scale)
        small = jax.ShapeDtypeStruct((16, K), jnp.bfloat16)
        large = jax.ShapeDtypeStruct((256, K), jnp.bfloat16)
        assert op.gemm_path(weight, weight_scale, input=small) is scaled_mm.xla_per_token_w8a8_scaled_mm
        assert op.gemm_path(weight, weight_scale, input=large) is scaled_mm.fused_w8a8_scaled_mm
    with platform.override(fused_kernel=None):
        assert op.gemm_path(weight, weight_scale) is scaled_mm.xla_per_token_w8a8_scaled_mm


def test_plan_is_pure():
    """The plan reads nothing but its arguments: the same answer under any platform override."""
    scheme = Fp8Scheme("per_channel", "dynamic_per_token")
    args = dict(
        input_shape=(256, 4096),
        input_dtype=jnp.bfloat16,
        weight_shape=(4096, 4096),
        weight_dtype=jnp.float8_e4m3fn,
        out_dtype=jnp.bfloat16,
    )
    kernel = FusedKernel(scaled_mm=lambda *a: None, supports_device=lambda d: True)
    plans = []
    for override in (None, kernel):
        with platform.override(fused_kernel=override):
            plans.append((dispatch.plan(scheme, kernel=kernel, **args), dispatch.plan(scheme, kernel=None, **args)))
    assert plans[0] == plans[1]
    assert plans[0][0].gemm == "fused_w8a8_scaled_mm" and plans[0][1].gemm == "xla_per_token_w8a8_scaled_mm"
