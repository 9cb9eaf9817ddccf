"""Shared set-up of the TPU kernel tests: interpret-mode parameters and the real-TPU gate."""

import jax
import pytest
from jax.experimental.pallas import tpu as pltpu

ON_TPU = jax.devices()[0].platform == "tpu"

# TPU interpret mode on CPU. Buffers start as NaN (the default), so a block the kernel reads before
# writing (accumulator, cached codes, scales) poisons the output; the seed shuffles the order of
# the "parallel" grid axes, so a kernel relying on their order fails.
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", random_seed=0)

requires_tpu = pytest.mark.skipif(
    not ON_TPU, reason="needs a real TPU: compiles with Mosaic and runs on the chip (interpret mode covers numerics)"
)
