"""The XLA-path benchmark's variants compute what they claim (on CPU, at a small shape)."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from tests import reference

_spec = importlib.util.spec_from_file_location(
    "xla_paths", pathlib.Path(__file__).parents[1] / "benchmarks" / "xla_paths.py"
)
xla_paths = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xla_paths)


@pytest.mark.parametrize(
    "name",
    [
        "per_tensor",
        "per_tensor_dequant_pattern",
        "per_tensor_bf16_acc",
        "per_token",
        "channelwise",
        "xla_bf16",
        "op_per_token_e2e",
    ],
)
def test_variant_matches_float64(key, name):
    m, k, n = 24, 256, 128
    fn, operand_sets = xla_paths.jax_variants(m, k, n, key)[name]
    assert len(operand_sets) == xla_paths.COPIES
    activation, weight = operand_sets[1]
    out = np.asarray(jax.jit(fn)(*activation, *weight), np.float64)
    if name == "xla_bf16":
        ref = np.asarray(activation[0], np.float64) @ np.asarray(weight[0], np.float64).T
    elif name == "op_per_token_e2e":
        codes, scale = reference.quant_dynamic_per_token(activation[0])
        ref = reference.scaled_mm(codes, weight[0], scale, weight[1])
    else:
        ref = reference.scaled_mm(activation[0], weight[0], activation[1], weight[1])
    # bf16 output; the bf16-rounded-GEMM variant rounds twice (one more bf16 ulp).
    tolerance = 3 * 2.0**-8 + reference.gemm_tolerance(k, np.float32)
    assert np.abs(out - ref).max() <= tolerance * np.abs(ref).max()


def test_no_two_timed_gemms_share_an_operand():
    """XLA's dot merger would batch GEMMs sharing an operand and read it once (see NOTES.md)."""
    activations = [i for i, _ in xla_paths.PAIRS]
    weights = [j for _, j in xla_paths.PAIRS]
    assert len(set(activations)) == len(activations) and len(set(weights)) == len(weights)
