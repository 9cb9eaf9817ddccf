"""Pallas kernels behind the fused fp8 paths, one package per backend."""
