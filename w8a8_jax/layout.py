"""Array layouts the GEMM paths and kernels share: the contraction of K-major operands, tile padding."""

# Contract K (dim 1) of qinput (M, K) with K (dim 1) of weight (N, K): both operands K-major, the
# layout fp8 tensor cores and cuBLASLt's fp8 GEMM take without a transpose.
CONTRACT_K = (((1,), (1,)), ((), ()))


def num_blocks(size: int, block: int) -> int:
    """How many blocks (or groups) of `block` cover `size`, the last one partial: `ceil(size / block)`."""
    return -(-size // block)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return num_blocks(value, multiple) * multiple
