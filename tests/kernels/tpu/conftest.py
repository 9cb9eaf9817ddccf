"""Shared set-up of the TPU kernel tests: interpret-mode parameters and the real-TPU gate."""

import jax
import pytest
from jax.experimental.pallas import tpu as pltpu

ON_TPU = jax.devices()[0].platform == "tpu"

# TPU interpret mode on CPU. Buffers start as NaN (the default), so a block the kernel reads before
# writing (accumulator, cached codes, scales) poisons the output; the seed shuffles the order of
# the "parallel" grid axes, so a kernel relying on their order fails.
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", random_seed=0)


@pytest.fixture(autouse=True)
def _interpret_on_cpu():
    """Off a TPU, run each test on the CPU, where interpret mode is meant to run, also on a GPU host."""
    if ON_TPU:
        yield
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            yield


requires_tpu = pytest.mark.skipif(
    not ON_TPU, reason="needs a real TPU: compiles with Mosaic and runs on the chip (interpret mode covers numerics)"
)
