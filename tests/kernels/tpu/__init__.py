"""Tests of the Pallas TPU kernels (TPU interpret mode on CPU; real-TPU tests skip elsewhere)."""
