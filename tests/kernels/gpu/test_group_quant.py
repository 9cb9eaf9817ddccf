"""The Hopper per-token-group quant kernel: codes and scales bit-identical to the XLA formula
(`quantization.quantize_per_token_group`), in Mosaic GPU interpret mode on CPU, lowered for CUDA on
any host, and compiled on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.kernels.gpu.test_lowering import lowers_to_mosaic_gpu, spec
from w8a8_jax import quantization
from w8a8_jax.kernels.gpu import group_quant, supports_device

on_hopper = jax.devices()[0].platform == "gpu" and supports_device(jax.devices()[0])


def groups_of_every_kind(key, m, k, dtype):
    """Rows of mixed magnitude, a 30x outlier group, an all-zero group where K allows, and in one
    row a NaN and an Inf (skipped by the amax, NaN kept as a code)."""
    x = jax.random.normal(key, (m, k), jnp.float32) * jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), (m, 1)))
    x = x.at[:, :128].multiply(30.0)
    if k >= 384:
        x = x.at[:, 128:256].set(0.0)
    x = x.at[m // 2, k - 3].set(jnp.nan).at[m // 2, 5].set(jnp.inf)
    return x.astype(dtype)


def check_identical(x, *, interpret):
    """Bit for bit against the NumPy reference and against the XLA formula the plan runs otherwise."""
    q, scale = group_quant.per_token_group_quant(x, 128, jnp.float8_e4m3fn, interpret=interpret)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == jnp.float32 and scale.shape == (x.shape[0], x.shape[1] // 128)
    for q_ref, scale_ref in (
        reference.quant_per_token_group(x, 128),
        quantization.quantize_per_token_group(x, 128, jnp.float8_e4m3fn),
    ):
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(scale_ref))
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_ref).view(np.uint8))
    return q, scale


# M below, at and past one 64-row tile (the last tile moved back to overlap the one before it).
@pytest.mark.parametrize(
    "m, k, dtype",
    [
        (1, 128, jnp.bfloat16),
        (63, 640, jnp.float16),
        (64, 384, jnp.float32),
        (100, 512, jnp.bfloat16),
        (130, 1152, jnp.bfloat16),
    ],
)
@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="a CPU check: on a GPU the interpreter's division differs by an ulp (the Hopper test below is the GPU's)",
)
def test_interpret_identical_to_the_xla_formula(key, m, k, dtype):
    q, scale = check_identical(groups_of_every_kind(key, m, k, dtype), interpret=True)
    if k >= 384:  # an all-zero group gets the eps floor and zero codes
        assert (np.asarray(scale[:, 1]) == np.float32(np.float32(quantization.GROUP_EPS) / np.float32(448))).all()
        assert (np.asarray(q[:, 128:256]).view(np.uint8) == 0).all()


def test_supports_and_rejects():
    assert group_quant.supports(7168, 128, jnp.bfloat16, jnp.float8_e4m3fn)
    assert not group_quant.supports(7168, 64, jnp.bfloat16, jnp.float8_e4m3fn)
    assert not group_quant.supports(200, 128, jnp.bfloat16, jnp.float8_e4m3fn)
    assert not group_quant.supports(7168, 128, jnp.bfloat16, jnp.float8_e4m3fnuz)
    x = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_size=64"):
        group_quant.per_token_group_quant(x, 64, jnp.float8_e4m3fn, interpret=True)
    with pytest.raises(NotImplementedError, match="float8_e4m3fnuz"):
        group_quant.per_token_group_quant(x, 128, jnp.float8_e4m3fnuz, interpret=True)
    with pytest.raises(TypeError, match="x must be"):
        group_quant.per_token_group_quant(x.astype(jnp.int32), 128, jnp.float8_e4m3fn, interpret=True)
    q, scale = group_quant.per_token_group_quant(x[:0], 128, jnp.float8_e4m3fn)
    assert q.shape == (0, 256) and scale.shape == (0, 2)


def test_lowers():
    assert lowers_to_mosaic_gpu(
        lambda x: group_quant.per_token_group_quant(x, 128, jnp.float8_e4m3fn), spec((4100, 7168), jnp.bfloat16)
    )


@pytest.mark.skipif(not on_hopper, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("m, k", [(1, 7168), (100, 1536), (4096, 7168), (4101, 18432)])
def test_hopper_identical_to_the_xla_formula(key, m, k):
    check_identical(groups_of_every_kind(key, m, k, jnp.bfloat16), interpret=False)
