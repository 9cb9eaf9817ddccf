"""Input checks shared by the public functions; each error names the argument and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np

from w8a8_jax import dtypes, layout


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def check_float_input(name: str, x: jax.Array, ndim: int | None = None) -> None:
    """`x` must be bf16/f16/f32 (and have `ndim` dimensions if given)."""
    if np.dtype(x.dtype) not in dtypes.FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {_dtype_name(x.dtype)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_fp8(name: str, x: jax.Array, ndim: int = 2) -> None:
    """`x` must be an fp8 (e4m3fn or e4m3fnuz) array with `ndim` dimensions."""
    if not dtypes.is_fp8(x.dtype):
        raise TypeError(f"{name} must be float8_e4m3fn or float8_e4m3fnuz, got {_dtype_name(x.dtype)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_out_dtype(out_dtype) -> np.dtype:
    """Returns `out_dtype` as a NumPy dtype if it is bf16, f16 or f32."""
    try:
        dtype = np.dtype(out_dtype)
    except TypeError:
        dtype = None
    if dtype not in dtypes.FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    return dtype


def as_scale(name: str, scale) -> jax.Array:
    """Converts a scale (array or Python number) to a float32 array, rejecting non-float dtypes."""
    scale = jnp.asarray(scale) if not isinstance(scale, jax.Array) else scale
    if not jnp.issubdtype(scale.dtype, jnp.floating) or dtypes.is_fp8(scale.dtype):
        raise TypeError(f"{name} must be a float32 array (or float), got {_dtype_name(scale.dtype)}")
    return scale.astype(jnp.float32)


def check_scale_values(name: str, scale: jax.Array) -> None:
    """Rejects a concrete scale with a non-finite or non-positive entry (traced scales pass)."""
    if isinstance(scale, jax.core.Tracer):
        return
    values = np.asarray(scale)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0, got {values[bad].ravel()[:4]} among its values")


def check_finite(name: str, x, what: str = "") -> None:
    """Rejects a concrete array holding NaN or ±Inf (traced arrays pass); `what` ends the message."""
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x)
    if values.dtype.kind == "f" or dtypes.is_fp8(values.dtype) or values.dtype == jnp.bfloat16:
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values.astype(np.float32))))
        if bad:
            raise ValueError(f"{name} holds {bad} NaN or Inf value{'s' if bad > 1 else ''}{what}")


def per_tensor_scale(name: str, scale) -> jax.Array:
    """A one-value scale (array or number; shape (), (1,) or (1, 1)) checked and returned as `(1,)` float32."""
    scale = as_scale(name, scale)
    if not is_per_tensor(scale):
        raise ValueError(f"{name} must have shape (1,), got {tuple(scale.shape)}")
    check_scale_values(name, scale)
    return scale.reshape(1)


def is_per_tensor(scale: jax.Array) -> bool:
    """A scale with one element (shape (), (1,) or (1, 1))."""
    return scale.size == 1 and scale.ndim <= 2


def check_row_scale(name: str, scale: jax.Array, rows: int, what: str) -> None:
    """`scale` must be per-tensor or one value per row: shape (1,), (), (rows, 1) or (rows,)."""
    if is_per_tensor(scale) or tuple(scale.shape) in ((rows, 1), (rows,)):
        return
    raise ValueError(
        f"{name} must be per-tensor (shape (1,)) or one per {what} (shape ({rows}, 1)), got shape {tuple(scale.shape)}"
    )


def check_group_size(name: str, size) -> int:
    """A group or block size: an int >= 1."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    return int(size)


def check_block_scale(name: str, scale: jax.Array, rows: int, cols: int, block_size, what: str) -> None:
    """`scale` must hold one value per `block_size` block of a `(rows, cols)` array:
    `(ceil(rows / b0), ceil(cols / b1))`."""
    expected = (layout.num_blocks(rows, block_size[0]), layout.num_blocks(cols, block_size[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name} must be {expected}, one per {block_size[0]}x{block_size[1]} block of {what} ({rows}, {cols}), "
            f"got shape {tuple(scale.shape)}"
        )


def check_gemm_operands(qinput, weight, scale_a, scale_b, bias, out_dtype):
    """Validates a scaled GEMM's operands; returns `(scale_a, scale_b, bias, out_dtype)` normalized.

    `qinput (M, K)` and `weight (N, K)` of one fp8 dtype; scales per tensor or one per row of their
    operand, finite and > 0 where concrete; `bias (N,)` float or None; out_dtype bf16/f16/f32.
    """
    check_fp8("qinput", qinput)
    check_fp8("weight", weight)
    if qinput.dtype != weight.dtype:
        raise TypeError(f"qinput and weight must share one fp8 dtype, got {qinput.dtype} and {weight.dtype}")
    (m, k), (n, weight_k) = qinput.shape, weight.shape
    if weight_k != k:
        raise ValueError(f"weight must be (N, K) with K={k} (qinput's last dim), got shape {tuple(weight.shape)}")
    scale_a = as_scale("scale_a", scale_a)
    scale_b = as_scale("scale_b", scale_b)
    check_row_scale("scale_a", scale_a, m, "token (row of qinput)")
    check_row_scale("scale_b", scale_b, n, "output channel (row of weight)")
    check_scale_values("scale_a", scale_a)
    check_scale_values("scale_b", scale_b)
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        check_float_input("bias", bias)
    return scale_a, scale_b, bias, check_out_dtype(out_dtype)
