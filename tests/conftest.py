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
