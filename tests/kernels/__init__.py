"""Tests of the Pallas kernels, mirroring `w8a8_jax/kernels`."""
