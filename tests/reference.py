"""Independent NumPy references, written from vLLM's formulas (never by calling w8a8_jax).

Quantization is emulated in float32 exactly as vLLM's kernels compute it (the amax over the finite
entries only, as its `fmaxf` skips NaN); GEMMs are float64.
"""

import jax
import ml_dtypes
import numpy as np

FP8_MAX = {np.dtype(ml_dtypes.float8_e4m3fn): 448.0, np.dtype(ml_dtypes.float8_e4m3fnuz): 224.0}


def to_np(x) -> np.ndarray:
    """Any array (JAX, NumPy, bf16, fp8) as a NumPy array of its own dtype."""
    return np.asarray(x)


def fp8_cast(values_f32: np.ndarray, fp8_dtype) -> np.ndarray:
    bound = np.float32(FP8_MAX[np.dtype(fp8_dtype)])
    return np.clip(values_f32.astype(np.float32), -bound, bound).astype(fp8_dtype)


def quant_static(x, scale, fp8_dtype=ml_dtypes.float8_e4m3fn) -> np.ndarray:
    """Codes for a static per-tensor scale: fp8(clamp(x * (1/s))) in float32."""
    x = to_np(x).astype(np.float32)
    inverse = np.float32(1.0) / np.float32(np.asarray(scale).reshape(()))
    return fp8_cast(x * inverse, fp8_dtype)


def finite_amax(x: np.ndarray, axis=None) -> np.ndarray:
    """max |x| over the finite entries (0 where none): NaN and ±Inf never set a scale."""
    magnitude = np.abs(x)
    magnitude[~np.isfinite(magnitude)] = 0
    return magnitude.max(axis=axis, keepdims=axis is not None, initial=0).astype(np.float32)


def quant_dynamic_per_tensor(x, fp8_dtype=ml_dtypes.float8_e4m3fn):
    """(codes, scale (1,)) with s = amax / max (float32 division); an all-zero input gets
    s = 1 / (max * 512)."""
    x = to_np(x).astype(np.float32)
    fp8_max = np.float32(FP8_MAX[np.dtype(fp8_dtype)])
    scale = np.float32(finite_amax(x)) / fp8_max
    if scale < np.finfo(np.float32).tiny:
        scale = np.float32(1.0) / (fp8_max * np.float32(512.0))
    return quant_static(x, scale, fp8_dtype), np.array([scale], np.float32)


def quant_dynamic_per_token(x, scale_ub=None, fp8_dtype=ml_dtypes.float8_e4m3fn):
    """(codes, scales (M, 1)) with s_m = max(min(amax_m, ub) / max, 1 / (max * 512))."""
    x = to_np(x).astype(np.float32)
    fp8_max = np.float32(FP8_MAX[np.dtype(fp8_dtype)])
    amax = finite_amax(x, axis=1)
    if scale_ub is not None:
        amax = np.minimum(amax, np.float32(np.asarray(scale_ub).reshape(())))
    scale = np.maximum(amax / fp8_max, np.float32(1.0) / (fp8_max * np.float32(512.0))).astype(np.float32)
    return fp8_cast(x / scale, fp8_dtype), scale


def quant_per_token_group(x, group, fp8_dtype=ml_dtypes.float8_e4m3fn, eps=1e-10, ue8m0=False):
    """(codes (M, K), scales (M, ceil(K / group))): per row and group, s = max(amax, eps) / max in
    float32, with `ue8m0` floored at 1e-10 and rounded up to a power of two; codes fp8(clamp(x / s))."""
    x = to_np(x).astype(np.float32)
    fp8_max = np.float32(FP8_MAX[np.dtype(fp8_dtype)])
    groups = -(-x.shape[1] // group)
    codes = np.empty(x.shape, np.dtype(fp8_dtype))
    scales = np.empty((x.shape[0], groups), np.float32)
    for g in range(groups):
        part = x[:, g * group : (g + 1) * group]
        scale = np.maximum(finite_amax(part, axis=1), np.float32(eps)) / fp8_max
        if ue8m0:  # vLLM: exp2(ceil(log2(max(s, 1e-10))))
            scale = (2.0 ** np.ceil(np.log2(np.maximum(scale.astype(np.float64), 1e-10)))).astype(np.float32)
        scales[:, g] = scale[:, 0]
        codes[:, g * group : (g + 1) * group] = fp8_cast(part / scale, fp8_dtype)
    return codes, scales


def quant_block_weight(w, block, fp8_dtype=ml_dtypes.float8_e4m3fn):
    """(codes (N, K), scales (ceil(N / bn), ceil(K / bk))): per block s = amax / max in float32 (an
    all-zero block gets 1 / (max * 512)); codes fp8(clamp(w / s))."""
    w = to_np(w).astype(np.float32)
    (bn, bk), fp8_max = block, np.float32(FP8_MAX[np.dtype(fp8_dtype)])
    rows, cols = -(-w.shape[0] // bn), -(-w.shape[1] // bk)
    codes = np.empty(w.shape, np.dtype(fp8_dtype))
    scales = np.empty((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            part = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            scale = np.float32(finite_amax(part)) / fp8_max
            if scale < np.finfo(np.float32).tiny:
                scale = np.float32(1.0) / (fp8_max * np.float32(512.0))
            scales[i, j] = scale
            codes[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = fp8_cast(part / scale, fp8_dtype)
    return codes, scales


def dequantize_blocks(codes, scales, block) -> np.ndarray:
    """float64 `codes[r, c] * scales[r // b0, c // b1]`."""
    codes = to_np(codes).astype(np.float64)
    expanded = np.repeat(np.repeat(np.asarray(scales, np.float64), block[0], 0), block[1], 1)
    return codes * expanded[: codes.shape[0], : codes.shape[1]]


def block_scaled_mm(qinput, weight, scale_a, scale_b, block, bias=None) -> np.ndarray:
    """float64 `sum_kb scale_a[m, kb] * scale_b[n // bn, kb] * (qinput @ weight.T)_kb + bias`: the
    scales are constant on each block, so the sum is `dequant(qinput) @ dequant(weight).T`."""
    out = dequantize_blocks(qinput, scale_a, (1, block[1])) @ dequantize_blocks(weight, scale_b, block).T
    if bias is not None:
        out = out + to_np(bias).astype(np.float64)
    return out


def scaled_mm(qinput, weight, scale_a, scale_b, bias=None) -> np.ndarray:
    """float64 `scale_a * scale_b * (qinput @ weight.T) + bias`; scales (1,)/(M,1) and (1,)/(N,1)."""
    acc = to_np(qinput).astype(np.float64) @ to_np(weight).astype(np.float64).T
    out = acc * np.asarray(scale_a, np.float64).reshape(-1, 1) * np.asarray(scale_b, np.float64).reshape(1, -1)
    if bias is not None:
        out = out + to_np(bias).astype(np.float64)
    return out


# Hopper's fp8 tensor cores (cuBLASLt's fp8 GEMM, `wgmma`) sum the products of each k-block with
# fewer bits than float32. Measured on H100 relative to max |ref|: our kernel 4.5e-5 at K=4096 and
# 1.6e-4 at K=14336 (each 128-wide k-block promoted into float32; unpromoted 6e-3, 12x this
# floor); XLA's cuBLASLt fp8 GEMM up to 3.1e-4 at K=1024.
TENSOR_CORE_FLOOR = 2.0**-11


def gemm_tolerance(k: int, out_dtype) -> float:
    """Relative (to max |ref|) error bound for a scaled fp8 GEMM with K terms rounded to out_dtype.

    Rounding to the output dominates: half an ulp relative (bf16 2^-8, f16 2^-11, f32 2^-24) of the
    largest output, plus float32 accumulation, whose error grows at most like K * 2^-24 and in
    practice like sqrt(K) * 2^-24; on a GPU, no less than the fp8 tensor cores' own accumulation
    error. A wrong scale, a transposed operand or a dropped bias moves the result by orders of
    magnitude more.
    """
    unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}[np.dtype(out_dtype).name]
    tolerance = 2 * unit + 4 * np.sqrt(k) * 2.0**-24
    return max(tolerance, TENSOR_CORE_FLOOR) if jax.default_backend() == "gpu" else tolerance


def assert_gemm_close(out, ref, k: int, out_dtype) -> None:
    """Checks out against the float64 reference with `gemm_tolerance`, scaled by max |ref|."""
    out = to_np(out).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), "non-finite output"
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    tol = gemm_tolerance(k, out_dtype)
    assert err <= tol, f"max error {err:.3g} (relative to max |ref|) exceeds {tol:.3g}"


def assert_bit_identical(got, want) -> None:
    """Same shape, dtype and bits (fp8 codes compared as bytes, float32 scales as words)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    bits = np.uint8 if got.itemsize == 1 else np.uint32
    differ = got.view(bits) != want.view(bits)
    assert not differ.any(), f"{differ.sum()} of {got.size} values differ"


def assert_codes_identical(got, want) -> None:
    """fp8 codes bit-identical, but for NaN codes, compared by position (a NaN's sign bit is free)."""
    got, want = np.asarray(got), np.asarray(want)
    got_nan, want_nan = np.isnan(got.astype(np.float32)), np.isnan(want.astype(np.float32))
    assert got.shape == want.shape and (got_nan == want_nan).all(), (
        f"NaN codes at {np.argwhere(got_nan != want_nan)[:4]}"
    )
    assert_bit_identical(got[~want_nan], want[~want_nan])


def _rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    """float64 `weight * x / sqrt(mean(x^2) + eps)` over the last axis."""
    return np.asarray(weight, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope_half_split(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """float64 rotary embedding of `x (T, heads, D)` at `positions (T,)`: pair `(i, i + D/2)` turns
    by `angle = pos / theta^(2i/D)` to `[x1 cos - x2 sin, x2 cos + x1 sin]`."""
    x = np.asarray(x, np.float64)
    dim = x.shape[-1]
    out = np.empty_like(x)
    for t, pos in enumerate(np.asarray(positions)):
        for i in range(dim // 2):
            angle = float(pos) / float(theta) ** (2.0 * i / dim)
            c, s = np.cos(angle), np.sin(angle)
            x1, x2 = x[t, :, i], x[t, :, i + dim // 2]
            out[t, :, i] = x1 * c - x2 * s
            out[t, :, i + dim // 2] = x2 * c + x1 * s
    return out


def llama_logits(tensors, config, tokens) -> np.ndarray:
    """float64 logits `(T, vocab)` of a Llama causal decoder on `tokens (T,)` from position 0, from
    Hugging Face-named float weights (`(N, K)` linear weights) and a config with the `LlamaConfig`
    field names: pre-norm layers `h = x + o(attn(norm(x)))`, `h + down(silu(gate n) * up n)` with
    `n = norm(h)`; grouped-query causal attention (query head `h` reads KV head
    `h // (heads / kv_heads)`) with scores `q.k / sqrt(D)`; a final norm; the head `lm_head.weight`,
    or the embedding when tied."""

    def w(name):
        return np.asarray(tensors[name], np.float64)

    tokens = np.asarray(tokens)
    length, dim = len(tokens), config.head_dim
    heads, kv_heads, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    positions = np.arange(length)
    causal = np.tril(np.ones((length, length), bool))
    x = w("model.embed_tokens.weight")[tokens]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        normed = _rms_norm(x, tensors[prefix + "input_layernorm.weight"], eps)
        q = (normed @ w(prefix + "self_attn.q_proj.weight").T).reshape(length, heads, dim)
        k = (normed @ w(prefix + "self_attn.k_proj.weight").T).reshape(length, kv_heads, dim)
        v = (normed @ w(prefix + "self_attn.v_proj.weight").T).reshape(length, kv_heads, dim)
        q = rope_half_split(q, positions, config.rope_theta)
        k = rope_half_split(k, positions, config.rope_theta)
        attended = np.empty((length, heads, dim))
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(dim)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            attended[:, head] = probs @ v[:, kv]
        x = x + attended.reshape(length, heads * dim) @ w(prefix + "self_attn.o_proj.weight").T
        normed = _rms_norm(x, tensors[prefix + "post_attention_layernorm.weight"], eps)
        gate = normed @ w(prefix + "mlp.gate_proj.weight").T
        up = normed @ w(prefix + "mlp.up_proj.weight").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w(prefix + "mlp.down_proj.weight").T
    x = _rms_norm(x, tensors["model.norm.weight"], eps)
    head = w("model.embed_tokens.weight") if config.tie_word_embeddings else w("lm_head.weight")
    return x @ head.T
