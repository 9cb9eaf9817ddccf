"""Accuracy of an fp8 result against its float reference: SQNR and relative error, in one place."""

import math

import numpy as np


def sqnr_db_of_energies(signal: float, noise: float) -> float:
    """`10 log10(signal / noise)` from the summed squares; inf when noise is 0, -inf when signal is."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def rel_error_of_maxima(max_error: float, max_reference: float) -> float:
    """`max |error| / max |reference|` from the two maxima (the bare error when the reference is 0)."""
    return float(max_error / max_reference) if max_reference else float(max_error)


def sqnr_db(reference, approximation) -> float:
    """`10 log10(sum reference^2 / sum (approximation - reference)^2)`, in float64."""
    reference = np.asarray(reference, np.float64)
    noise = np.sum(np.square(np.asarray(approximation, np.float64) - reference))
    return sqnr_db_of_energies(float(np.sum(np.square(reference))), float(noise))


def max_rel_error(reference, approximation) -> float:
    """`max |approximation - reference| / max |reference|`, in float64."""
    reference = np.asarray(reference, np.float64)
    error = np.max(np.abs(np.asarray(approximation, np.float64) - reference))
    return rel_error_of_maxima(float(error), float(np.max(np.abs(reference))))
