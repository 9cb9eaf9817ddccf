"""Test set-up: 8 host devices (for sharding tests) before JAX starts; fresh keys per test."""

import os
import zlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import pytest


@pytest.fixture
def key(request):
    """A key unique to the test (its node id), so every test draws its own random data."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def pytest_addoption(parser):
    parser.addoption(
        "--one-case-each",
        action="store_true",
        help="under tests/kernels, run the first case of each parametrized test only (CI's newest-JAX "
        "phase, which checks the kernels against JAX's newest APIs; the pinned phase runs every case)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--one-case-each"):
        return
    seen, kept, dropped = set(), [], []
    for item in items:
        name = (item.path, getattr(item, "originalname", item.name))
        first = name not in seen
        seen.add(name)
        (kept if first or "tests/kernels/" not in item.path.as_posix() else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept
