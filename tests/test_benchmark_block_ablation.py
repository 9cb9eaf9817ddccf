"""The block-kernel ablation on CPU: every source edit still matches the kernel, and an edit changes
the kernel that runs (interpret mode, tiny shapes)."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import block_ablation  # noqa: E402

from w8a8_jax.kernels.gpu import scaled_mm  # noqa: E402


@pytest.mark.parametrize("edit", sorted(block_ablation.EDITS))
def test_every_edit_matches_the_kernel_source_once(edit):
    edited = block_ablation.edited_source([edit])
    for old, new in block_ablation.EDITS[edit]:
        assert old not in edited and new in edited


@pytest.fixture
def restored_kernel():
    """The kernel an edit replaces, put back after the test, and the traces made with the edited one
    dropped, so no later test in this process runs it."""
    kernel = scaled_mm._gemm_kernel
    yield
    scaled_mm._gemm_kernel = kernel
    jax.clear_caches()


def test_edited_kernel_runs_and_differs(restored_kernel):
    plain = block_ablation.run_one("narrow", 256, 256, 256, interpret=True, r=1)
    assert plain["rel_err"] < 1e-2 and plain["us"] > 0  # bf16 out: about 4e-3 at most
    edited = block_ablation.run_one("narrow+no_scales", 256, 256, 256, interpret=True, r=1)
    assert edited["rel_err"] > 1.0  # the unscaled sums are some 10^4 times the scaled ones
    with pytest.raises(ValueError, match="unknown variant"):
        block_ablation.run_one("narrow+no_such_edit", 256, 256, 256, interpret=True)


def test_variant_names():
    config, edits = block_ablation.parse_variant("narrow_k4+no_scales+producer_24")
    assert (config.cta_n, config.k_splits, edits) == (128, 4, ["no_scales", "producer_24"])
    assert block_ablation.parse_variant("wide_n")[0].wg_split == "n"
    assert block_ablation.parse_variant("wide_c64_pw")[0].promote_n == 64
    assert block_ablation.parse_variant("rowwise_narrow")[0] == block_ablation.parse_variant("narrow")[0]
    for bad in ("narrow_kx", "narrow_4", "tall"):
        with pytest.raises(ValueError, match="unknown variant"):
            block_ablation.parse_variant(bad)
