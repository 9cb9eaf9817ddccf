"""The dispatch picks the TPU kernels on a TPU backend: registration, device detection, forced runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.kernels.tpu.conftest import INTERPRET
from w8a8_jax import Fp8LinearOp, dispatch_w8a8_scaled_mm, fused_w8a8_scaled_mm, platform, scaled_fp8_quant
from w8a8_jax.kernels import tpu
from w8a8_jax.kernels.tpu import hardware


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    platform: str
    device_kind: str


@pytest.mark.parametrize(
    "device_kind, generation, fp8_mxu",
    [("TPU v5 lite", "v5e", False), ("TPU v6 lite", "v6e", False), ("TPU7x", "v7", True), ("TPU v5p", "v5p", False)],
)
def test_tpu_backend_selects_registered_kernel(monkeypatch, device_kind, generation, fp8_mxu):
    device = FakeDevice("tpu", device_kind)
    monkeypatch.setattr(platform, "_default_device", lambda: device)
    kernel = platform.fused_kernel()
    assert kernel is platform._registry["tpu"] and kernel.scaled_mm.func is tpu.w8a8_scaled_mm
    assert kernel.per_token_quant.func is tpu.per_token_quant
    assert platform.fused_fp8_supported()
    assert dispatch_w8a8_scaled_mm(platform.fused_fp8_supported(), True, True, False) is fused_w8a8_scaled_mm
    gen = hardware.generation_of(device)
    assert gen.name == generation and gen.fp8_mxu == fp8_mxu
    assert hardware.mxu_dtype(gen, jnp.float8_e4m3fn) == (jnp.float8_e4m3fn if fp8_mxu else jnp.bfloat16)


@pytest.mark.parametrize("device", [FakeDevice("tpu", "TPU v3"), FakeDevice("cpu", "cpu")])
def test_unsupported_devices_fall_back(monkeypatch, device):
    monkeypatch.setattr(platform, "_default_device", lambda: device)
    assert platform.fused_kernel() is None and not platform.fused_fp8_supported()


def counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(fn.__name__ if hasattr(fn, "__name__") else fn.func.__name__)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize(
    "scheme, expected_calls",
    [
        ("dynamic_per_token", ["fused_quant_scaled_mm"]),  # quantized inside the GEMM kernel
        ("static", ["fused_quant_scaled_mm"]),
        ("dynamic_per_tensor", ["w8a8_scaled_mm"]),  # needs a global amax first: XLA quant, TPU GEMM
    ],
)
def test_forced_capability_runs_tpu_kernels_through_fp8_linear_op(key, scheme, expected_calls):
    """Fp8LinearOp on a (forced) TPU runs the TPU kernels for every activation scheme, on CPU."""
    calls = []
    base = tpu.make_fused_kernel(interpret=INTERPRET)
    kernel = dataclasses.replace(
        base,
        scaled_mm=counting(base.scaled_mm, calls),
        per_token_quant=counting(base.per_token_quant, calls),
        quant_scaled_mm=counting(base.quant_scaled_mm, calls),
    )
    ks = jax.random.split(key, 4)
    m, k, n = 19, 384, 256  # shapes of this test only, so the op's jit cache holds no other kernel
    x = (jax.random.normal(ks[0], (m, k)) * 2).astype(jnp.bfloat16)
    weight = jnp.clip(jax.random.normal(ks[1], (n, k)) * 100, -448, 448).astype(jnp.float8_e4m3fn)
    weight_scale = jax.random.uniform(ks[2], (n, 1), minval=0.5, maxval=2.0) * 1e-3
    bias = jax.random.normal(ks[3], (n,))
    input_scale = jnp.array([0.02], jnp.float32) if scheme == "static" else None
    with platform.override(fused_kernel=kernel):
        op = Fp8LinearOp(use_per_token_if_dynamic=scheme == "dynamic_per_token", pad_output=False)
        assert op.fused_supported
        out = op.apply(x, weight, weight_scale, input_scale=input_scale, bias=bias)
    assert calls == expected_calls, calls
    if scheme == "dynamic_per_token":
        codes, x_scale = reference.quant_dynamic_per_token(x)
    elif scheme == "static":
        codes, x_scale = reference.quant_static(x, 0.02), np.array([0.02], np.float32)
    else:
        codes, x_scale = reference.quant_dynamic_per_tensor(x)
    reference.assert_gemm_close(out, reference.scaled_mm(codes, weight, x_scale, weight_scale, bias), k, jnp.bfloat16)


def test_forced_capability_scaled_fp8_quant_is_exact(key):
    x = (jax.random.normal(key, (21, 200)) * 5).astype(jnp.float16)
    with platform.override(fused_kernel=tpu.make_fused_kernel(interpret=INTERPRET)):
        q, scale = scaled_fp8_quant(x, use_per_token_if_dynamic=True, num_token_padding=24)
    ref_q, ref_scale = reference.quant_dynamic_per_token(x)
    np.testing.assert_array_equal(np.asarray(q[:21]).view(np.uint8), ref_q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(scale[:21]), ref_scale)
    assert not np.asarray(q[21:], np.float32).any() and not np.asarray(scale[21:]).any()
