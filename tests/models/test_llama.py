"""The Llama decoder of `w8a8_jax.models` on a tiny random model: the float forward and the KV cache
against the float64 `reference.llama_logits`, batching, compile counts, sampling, stop tokens,
errors, NaN isolation, scoring, the GGUF row order, Hugging Face directories and the fp8 schemes."""

import json
import re
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests import reference
from w8a8_jax import cli
from w8a8_jax.models import gguf_file, hf_checkpoint, schemes
from w8a8_jax.models.generate import Generator, perplexity, sample
from w8a8_jax.models.llama import KVCache, LlamaConfig, linear_names, norm_names, rope
from w8a8_jax.nnx import Fp8Dense

SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=1e4,
    rms_norm_eps=1e-5,
)
CONFIGS = {tied: LlamaConfig(**SHAPE, tie_word_embeddings=tied) for tied in (False, True)}
BUCKETS = (16, 32, 64)
# Prompts of three buckets' worth of lengths (3 and 11 alone fit 16, 17 needs 32).
PROMPT_LENGTHS = (3, 11, 17)
# float32 against float64 through 3 layers: every dot has K <= 128 terms, each rounded at 2^-24,
# and the norms and softmaxes add a few ulps; measured 2e-7 to 5e-7 of max |logit|. 1e-5 leaves
# 20x room, while a wrong RoPE pair, KV head, mask or norm eps (1e-2 for 1e-5: 1e-3) moves logits
# by far more.
FLOAT_TOLERANCE = 1e-5
# The scheme -> `w8a8-jax quantize` options, spelled out from the command line's documentation.
CLI_OPTIONS = {
    "channel-token": ["--weights", "channel", "--activations", "dynamic-token"],
    "tensor-static": ["--weights", "tensor", "--activations", "static"],
    "block": ["--weights", "block", "--activations", "dynamic-group"],  # default 128x128 blocks
}


def random_tensors(config: LlamaConfig, key: jax.Array) -> dict[str, np.ndarray]:
    """Float32 weights under Hugging Face names: linear weights `normal / sqrt(K)` and embeddings
    `normal` (O(1) activations everywhere), norm weights `1 + 0.1 normal`."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.mlp.gate_proj.weight": (inner, hidden),
            f"{layer}.mlp.up_proj.weight": (inner, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inner),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    sizes = {name: int(np.prod(shape)) for name, shape in sorted(shapes.items())}
    draws = np.asarray(jax.random.normal(key, (sum(sizes.values()),), jnp.float32))  # one draw: one compile
    tensors, offset = {}, 0
    for name, size in sizes.items():
        shape, normal = shapes[name], draws[offset : offset + size].reshape(shapes[name])
        offset += size
        if len(shape) == 1:
            tensors[name] = 1 + np.float32(0.1) * normal
        elif name == "model.embed_tokens.weight":
            tensors[name] = normal
        else:
            tensors[name] = normal / np.float32(np.sqrt(shape[1]))
    return tensors


def token_ids(seed: int, length: int, vocab: int = SHAPE["vocab_size"]) -> list[int]:
    """`length` random tokens below `vocab` (NumPy's generator: one JAX draw per length would compile)."""
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, length)]


# Every `all_logits` batch is (2, LENGTH): one compile per model structure.
LENGTH = 20


@nnx.jit
def all_logits(model, tokens):
    """Float32 logits `(B, T, V)` of `tokens (B, T)` from position 0, with a cache of exactly T."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache = KVCache.create(model.config, batch, length, jnp.float32)
    hidden, _ = model(tokens, positions, cache, jnp.zeros(batch, jnp.int32))
    return model.logits(hidden)


def assert_logits_close(got, want, tolerance=FLOAT_TOLERANCE):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= tolerance, f"max error {error:.3g} of max |logit| exceeds {tolerance:.3g}"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def float32_matmuls():
    """Full float32 dots on every backend (GPUs default to TF32, 10-bit mantissas), so the float
    tolerances hold there too; the fp8 GEMMs choose their own precision."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def tensors():
    """tied -> the float tensors of the tiny model."""
    return {tied: random_tensors(config, jax.random.key(100 + tied)) for tied, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def float_model(tensors):
    """The untied float32 model."""
    return hf_checkpoint.llama_from_tensors(CONFIGS[False], tensors[False])


@pytest.fixture(scope="module")
def generator(float_model):
    """A generator shared by the tests that do not count compiles."""
    return Generator(float_model, cache_length=128, buckets=BUCKETS)


@pytest.fixture(scope="module")
def prompts():
    return [token_ids(length, length) for length in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def calibration():
    return schemes.calibration_batches(token_ids(7, 32), length=16)  # two batches


@pytest.fixture(scope="module")
def quantized(tensors, calibration):
    """scheme name -> the untied model converted in memory to it (built once, on first use)."""
    models = {}

    def get(name):
        if name not in models:
            model = hf_checkpoint.llama_from_tensors(CONFIGS[False], tensors[False])
            schemes.quantize(model, name, calibration if schemes.SCHEMES[name].is_static else ())
            models[name] = model
        return models[name]

    return get


# --- float forward and KV cache -----------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_float_logits_match_the_float64_reference_at_every_position(tensors, tied):
    config = CONFIGS[tied]
    model = hf_checkpoint.llama_from_tensors(config, tensors[tied])
    assert (model.lm_head is None) == tied
    batch = [token_ids(row, LENGTH) for row in range(2)]
    logits = all_logits(model, jnp.asarray(batch, jnp.int32))
    for row, tokens in enumerate(batch):
        assert_logits_close(logits[row], reference.llama_logits(tensors[tied], config, tokens))


def test_rope_matches_the_half_split_formula(key):
    x = jax.random.normal(key, (2, 5, 3, 16), jnp.float32)
    positions = jax.random.randint(jax.random.fold_in(key, 1), (2, 5), 0, 200)
    got = np.asarray(jax.jit(rope, static_argnums=2)(x, positions, 1e4), np.float64)
    want = np.stack([reference.rope_half_split(x[b], np.asarray(positions[b]), 1e4) for b in range(2)])
    # float32 angles `pos * inv_freq` are off by up to ~2 pos 2^-24 radians, which moves a rotated
    # value by that times |x|; an interleaved pairing or a wrong frequency moves it by O(|x|).
    tolerance = (4 * 200 * 2.0**-24 + 1e-6) * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def test_prefill_then_decode_matches_the_reference_at_each_position(tensors, generator, prompts):
    """Teacher forcing: rows of three lengths decode at their own positions, one token a step."""
    steps = 8
    texts = [prompt + token_ids(50 + row, steps) for row, prompt in enumerate(prompts)]
    want = [reference.llama_logits(tensors[False], CONFIGS[False], text) for text in texts]
    _, logits, cache = generator.prefill(prompts)
    assert cache.length == 128
    assert cache.keys[0].shape == (len(prompts), SHAPE["num_key_value_heads"], 128, SHAPE["head_dim"])
    for row, prompt in enumerate(prompts):
        assert_logits_close(logits[row], want[row][len(prompt) - 1])
    positions = np.array([len(prompt) for prompt in prompts], np.int32)
    for step in range(steps):
        fed = np.array([text[position] for text, position in zip(texts, positions)], np.int32)
        _, logits, cache = generator.decode(fed, positions, cache)
        for row in range(len(prompts)):
            assert_logits_close(logits[row], want[row][positions[row]])
        positions = positions + 1


def test_the_decode_step_moves_no_cache_sized_array(float_model):
    """Attention reads the `(B, kv heads, S, head_dim)` cache as it lies: the compiled decode step
    transposes or copies nothing as large as one layer's cache (a `(B, S, kv heads, head_dim)`
    layout contracted by heads made XLA transpose the whole cache, every layer, every step)."""
    generator = Generator(float_model, cache_length=128, buckets=BUCKETS)
    batch = 3
    cache = KVCache.create(generator.config, batch, generator.cache_length, jnp.float32)
    layer_cache = cache.keys[0].size
    rows = jnp.zeros(batch, jnp.int32)
    hlo = (
        generator._decode.lower(
            generator._leaves, rows, rows + 5, cache.keys, cache.values, generator._sampling(None, 0.0, 1.0), 1
        )
        .compile()
        .as_text()
    )
    moved = []
    for match in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} (transpose|copy)\(", hlo):
        if np.prod([int(d) for d in match.group(1).split(",") if d]) >= layer_cache:
            moved.append(match.group(0))
    assert moved == []


# --- batching, buckets and compiles -------------------------------------------------------------


def test_a_batch_generates_what_each_prompt_generates_alone(generator, prompts):
    batched = generator.generate(prompts, 10)
    _, batched_logits, _ = generator.prefill(prompts)
    for row, prompt in enumerate(prompts):
        alone = generator.generate([prompt], 10)
        assert batched.tokens[row] == alone.tokens[0]
        assert len(alone.tokens[0]) == 10
        _, alone_logits, _ = generator.prefill([prompt])
        # The same float32 math on other shapes (bucket 16 or 32, batch 1 or 3): only XLA's
        # blocking of the dots differs, measured 3e-7 of max |logit| (2.5 ulps); 4e-6 is 30 ulps,
        # while padding or another row leaking in moves logits by O(max |logit|).
        assert_logits_close(batched_logits[row], np.asarray(alone_logits[0], np.float64), tolerance=4e-6)


def test_the_pad_token_changes_nothing(float_model, generator, prompts):
    other = Generator(float_model, cache_length=128, buckets=BUCKETS, pad_id=SHAPE["vocab_size"] - 1)
    assert other.pad_id != generator.pad_id
    # Same shapes, same program: padding is masked, so the logits and every cached key and value
    # of a real token (all that decoding reads) are bitwise the same.
    first, logits, cache = other.prefill(prompts)
    want_first, want_logits, want_cache = generator.prefill(prompts)
    reference.assert_bit_identical(first, want_first)
    reference.assert_bit_identical(logits, want_logits)
    for row, prompt in enumerate(prompts):
        for got, want in zip(cache.keys + cache.values, want_cache.keys + want_cache.values):
            reference.assert_bit_identical(got[row, :, : len(prompt)], want[row, :, : len(prompt)])
    text = token_ids(3, 21)  # its last window of 16 is padded
    for got, want in zip(other.score(text, window=16), generator.score(text, window=16)):
        reference.assert_bit_identical(got, want)


def test_prefill_compiles_once_per_bucket_and_decode_once(float_model):
    generator = Generator(float_model, cache_length=128, buckets=(64, 16, 32, 256))
    assert generator.buckets == (16, 32, 64)  # sorted; 256 cannot fit the cache
    assert [generator.bucket(n) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    lengths = (1, 2, 3, 5, 8, 12, 15, 16, 17, 20, 24, 29, 31, 32, 33, 40, 47, 53, 59, 60)
    for length in lengths:
        prompt = token_ids(length, length)
        assert len(generator.generate([prompt], 2).tokens[0]) == 2
    assert generator.compiles == Counter(prefill=3, decode=1)


# --- sampling -----------------------------------------------------------------------------------

# A fixed small logits vector with clear gaps, so nucleus boundaries are far from float rounding.
SAMPLE_LOGITS = np.array([1.0, 2.5, -1.0, 0.3, 1.8, -3.0, 0.0, -0.5], np.float32)
DRAWS = 20000


def softmax64(logits, temperature=1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus64(probs: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most probable tokens whose probability reaches top_p."""
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    return {int(t) for t in order[: int(np.searchsorted(cumulative, top_p)) + 1]}


@jax.jit
def draw_many(keys, logits, temperature, top_p):
    return jax.vmap(lambda k: sample(logits[None], k, temperature, top_p)[0])(keys)


def frequencies(key, temperature, top_p) -> np.ndarray:
    keys = jax.random.split(key, DRAWS)
    tokens = np.asarray(draw_many(keys, jnp.asarray(SAMPLE_LOGITS), jnp.float32(temperature), jnp.float32(top_p)))
    return np.bincount(tokens, minlength=len(SAMPLE_LOGITS)) / DRAWS


def assert_frequencies_match(got, probs):
    # Each frequency is a binomial mean: 5 standard deviations (plus one count) bound it at a
    # false-failure rate ~1e-6 per token; a missing temperature or a wrong nucleus moves a
    # probability by > 0.02, over 5x the bound.
    bound = 5 * np.sqrt(probs * (1 - probs) / DRAWS) + 1 / DRAWS
    assert (np.abs(got - probs) <= bound).all(), (got, probs, bound)


def test_temperature_zero_and_a_tiny_top_p_are_argmax(key):
    logits = jax.random.normal(key, (8, 96), jnp.float32) * 3
    want = np.argmax(np.asarray(logits), axis=-1)
    jitted = jax.jit(sample)
    np.testing.assert_array_equal(jitted(logits, jax.random.key(1), jnp.float32(0), jnp.float32(1)), want)
    for temperature in (0.5, 1.0, 5.0):
        for seed in range(3):
            got = jitted(logits, jax.random.key(seed), jnp.float32(temperature), jnp.float32(1e-6))
            np.testing.assert_array_equal(got, want)
    # Sanity of the test: with top_p 1 the same draws are not all the argmax.
    draws = [jitted(logits, jax.random.key(seed), jnp.float32(5.0), jnp.float32(1.0)) for seed in range(3)]
    assert any((np.asarray(d) != want).any() for d in draws)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_frequencies_are_the_softmax(key, temperature):
    assert_frequencies_match(frequencies(key, temperature, 1.0), softmax64(SAMPLE_LOGITS, temperature))


def test_top_p_draws_only_from_the_nucleus(key):
    probs = softmax64(SAMPLE_LOGITS)
    nucleus = nucleus64(probs, 0.7)
    assert 1 < len(nucleus) < len(SAMPLE_LOGITS)
    got = frequencies(key, 1.0, 0.7)
    outside = [t for t in range(len(SAMPLE_LOGITS)) if t not in nucleus]
    assert (got[outside] == 0).all(), f"drew tokens {[t for t in outside if got[t]]} outside the nucleus {nucleus}"
    renormalized = np.where([t in nucleus for t in range(len(probs))], probs, 0)
    assert_frequencies_match(got, renormalized / renormalized.sum())


def test_the_seed_decides_the_sampled_tokens(generator, prompts):
    def tokens(seed):
        return generator.generate(prompts[:1], 12, temperature=1.5, seed=seed).tokens

    assert tokens(3) == tokens(3)
    assert tokens(3) != tokens(4)


# --- stop tokens and errors ---------------------------------------------------------------------

EMPTY_PROMPTS = r"prompts must be a non-empty list of non-empty token lists"


def first_new(tokens: list[int]) -> int:
    """The index of the first token (past the first) that appeared nowhere before it."""
    return next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])


def test_a_stop_token_ends_only_its_row(generator, prompts):
    # Sampled (a fixed seed draws the same tokens whatever stops), since the random model's greedy
    # rows soon repeat one token.
    def run(max_new_tokens, stop_ids):
        return generator.generate(prompts, max_new_tokens, temperature=1.0, seed=1, stop_ids=stop_ids)

    free = run(12, [])
    assert [len(t) for t in free.tokens] == [12, 12, 12] and free.decode_steps == 11
    stop = free.tokens[0][first_new(free.tokens[0])]
    want = [row[: row.index(stop)] if stop in row else row for row in free.tokens]
    stopped = run(12, [stop])
    assert stopped.tokens == want
    assert len(want[0]) < 12 and max(len(row) for row in want[1:]) > len(want[0])  # others ran on
    # Stopping at the very first token leaves that row empty; no stop token runs max_new_tokens.
    assert run(12, [free.tokens[1][0]]).tokens[1] == []
    assert [len(t) for t in run(3, []).tokens] == [3, 3, 3]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda g, p: g.generate([p[0][:3] * 20], 70),
            r"a prompt of 60 tokens plus max_new_tokens=70 exceeds cache_length=128",
            id="cache-too-short",
        ),
        pytest.param(
            lambda g, p: g.generate([p[0][:1] * 65], 1),
            r"a prompt of 65 tokens exceeds the largest bucket 64",
            id="prompt-over-buckets",
        ),
        pytest.param(lambda g, p: g.generate([], 4), EMPTY_PROMPTS, id="no-prompts"),
        pytest.param(lambda g, p: g.generate([p[0], []], 4), EMPTY_PROMPTS, id="an-empty-prompt"),
        pytest.param(lambda g, p: g.prefill([]), EMPTY_PROMPTS, id="prefill-no-prompts"),
        pytest.param(lambda g, p: g.generate(p, 0), r"max_new_tokens must be >= 1, got 0", id="no-new-tokens"),
        pytest.param(
            lambda g, p: g.generate(p, 4, temperature=-0.1),
            r"temperature must be >= 0 and top_p in \(0, 1\], got -0.1 and 1.0",
            id="negative-temperature",
        ),
        pytest.param(lambda g, p: g.generate(p, 4, top_p=0.0), r"top_p in \(0, 1\], got 0.0 and 0.0", id="top-p-0"),
        pytest.param(lambda g, p: g.generate(p, 4, top_p=1.5), r"top_p in \(0, 1\], got 0.0 and 1.5", id="top-p-1.5"),
        pytest.param(lambda g, p: g.score([5]), r"at least 2 tokens, got shape \(1,\)", id="score-one-token"),
        pytest.param(lambda g, p: g.score([]), r"at least 2 tokens, got shape \(0,\)", id="score-no-tokens"),
        pytest.param(
            lambda g, p: g.score([[1, 2], [3, 4]]),
            r"a 1-D sequence of at least 2 tokens, got shape \(2, 2\)",
            id="score-2d",
        ),
    ],
)
def test_generator_errors(generator, prompts, call, match):
    with pytest.raises(ValueError, match=match):
        call(generator, prompts)


def test_a_generator_needs_a_bucket_that_fits_its_cache(float_model):
    with pytest.raises(ValueError, match=r"no bucket of \(16, 32\) fits cache_length=8"):
        Generator(float_model, cache_length=8, buckets=(16, 32))


# --- NaN isolation ------------------------------------------------------------------------------

NAN_TOKEN = SHAPE["vocab_size"] - 1


def poisoned(model):
    """A copy of `model` whose embedding row `NAN_TOKEN` is NaN."""
    model = nnx.clone(model)
    table = model.embed_tokens.embedding
    table.set_value(table[...].at[NAN_TOKEN].set(jnp.nan))
    return model


# Two prompts, the first in two versions: with NAN_TOKEN (at position 2) and without.
MATE = token_ids(11, LENGTH, vocab=NAN_TOKEN)
POISONED_MATE = MATE[:2] + [NAN_TOKEN] + MATE[3:]
PROMPT = token_ids(12, LENGTH, vocab=NAN_TOKEN)


@pytest.mark.parametrize("name", ["float", *schemes.SCHEMES])
def test_a_nan_embedding_stays_in_its_own_row(float_model, quantized, name):
    """Row 1's logits at every position are bitwise the same whether row 0 reads a NaN embedding
    or not: every scheme's activation scales are per token (or static), so nothing crosses rows."""
    model = poisoned(float_model if name == "float" else quantized(name))
    nan_logits = np.asarray(all_logits(model, jnp.asarray([POISONED_MATE, PROMPT], jnp.int32)))
    clean_logits = np.asarray(all_logits(model, jnp.asarray([MATE, PROMPT], jnp.int32)))
    assert np.isnan(nan_logits[0, 2:]).all() and np.isfinite(clean_logits).all()
    reference.assert_bit_identical(nan_logits[1], clean_logits[1])


def test_a_nan_embedding_does_not_reach_earlier_positions(float_model):
    """Causal isolation inside a row: the positions before the NaN token (at 2) stay finite and
    bitwise unchanged; it and every later position, which attend to it, are NaN, never a finite
    value computed without it."""
    tokens = jnp.asarray([POISONED_MATE, PROMPT], jnp.int32)
    logits = np.asarray(all_logits(poisoned(float_model), tokens))
    clean = np.asarray(all_logits(float_model, tokens))
    reference.assert_bit_identical(logits[0, :2], clean[0, :2])
    assert np.isnan(logits[0, 2:]).all()


def test_a_nan_embedding_stays_in_its_own_row_through_the_prefill(float_model):
    """The same through the prefill's padded batch: row 1's logits and cached keys and values
    (all that its decode steps read) do not see row 0's NaN."""
    generator = Generator(poisoned(float_model), cache_length=32, buckets=(32,))
    poisoned_mate = POISONED_MATE[:5]  # shorter than PROMPT: padded
    nan_first, nan_logits, nan_cache = generator.prefill([poisoned_mate, PROMPT])
    first, clean_logits, clean_cache = generator.prefill([MATE[:5], PROMPT])
    assert np.isnan(np.asarray(nan_logits[0])).all()
    reference.assert_bit_identical(nan_logits[1], clean_logits[1])
    assert int(nan_first[1]) == int(first[1])
    for got, want in zip(nan_cache.keys, clean_cache.keys):
        assert np.isnan(np.asarray(got[0, :, 2])).all()  # the NaN token's own keys
        reference.assert_bit_identical(got[1, :, : len(PROMPT)], want[1, :, : len(PROMPT)])
    for got, want in zip(nan_cache.values, clean_cache.values):
        assert not np.asarray(got[0, :, 2]).any()  # its values are cached as 0, which masked queries may multiply
        reference.assert_bit_identical(got[1, :, : len(PROMPT)], want[1, :, : len(PROMPT)])


# --- score and perplexity -----------------------------------------------------------------------


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_score_is_the_log_softmax_of_independent_windows(tensors, generator):
    window = 16
    text = token_ids(21, 41)  # 40 scored tokens: windows of 16, 16 and 8
    logprobs, predictions = generator.score(text, window=window)
    assert logprobs.shape == predictions.shape == (40,) and predictions.dtype == np.int32
    want_logprobs, want_predictions = [], []
    for begin in range(0, 40, window):
        inputs, targets = text[begin : begin + window], text[begin + 1 : begin + window + 1]
        logits = reference.llama_logits(tensors[False], CONFIGS[False], inputs)[: len(targets)]
        want_logprobs.append(log_softmax64(logits)[np.arange(len(targets)), targets])
        want_predictions.append(np.argmax(logits, axis=-1))
    want_logprobs = np.concatenate(want_logprobs)
    # log-softmax moves by at most twice the logits' largest error, FLOAT_TOLERANCE of max |logit|
    # (~3.3 here): 7e-5.
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(predictions, np.concatenate(want_predictions))
    np.testing.assert_allclose(perplexity(logprobs), np.exp(-want_logprobs.mean()), rtol=1e-4)


def test_perplexity_is_exp_of_minus_the_mean():
    logprobs = np.log(np.array([0.5, 0.25, 0.125], np.float32))
    np.testing.assert_allclose(perplexity(logprobs), 2.0**2, rtol=1e-6)  # geometric mean of 2, 4, 8
    assert perplexity(np.zeros(5)) == 1.0


# --- GGUF ---------------------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` permute of a query or key projection `(heads * D, K)`."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def interleaved_rope64(x: np.ndarray, position: int, theta: float) -> np.ndarray:
    """llama.cpp's RoPE of one head `x (D,)`: pair `(2j, 2j + 1)` turns by `pos / theta^(2j/D)`."""
    out, dim = np.empty(x.shape), x.shape[0]
    for j in range(dim // 2):
        angle = position / theta ** (2.0 * j / dim)
        c, s = np.cos(angle), np.sin(angle)
        out[2 * j], out[2 * j + 1] = x[2 * j] * c - x[2 * j + 1] * s, x[2 * j + 1] * c + x[2 * j] * s
    return out


@pytest.mark.parametrize(("heads", "dim"), [(1, 2), (3, 8), (2, 16)])
def test_unpermute_rope_rows_follows_the_index_formula(key, heads, dim):
    gguf_rows = np.asarray(jax.random.normal(key, (heads * dim, 5)), np.float64)
    got = gguf_file.unpermute_rope_rows(gguf_rows, heads)
    for h in range(heads):
        for s in range(2):
            for j in range(dim // 2):
                np.testing.assert_array_equal(got[h * dim + s * dim // 2 + j], gguf_rows[h * dim + 2 * j + s])
    np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(llama_cpp_permute(gguf_rows, heads), heads), gguf_rows)
    np.testing.assert_array_equal(llama_cpp_permute(got, heads), gguf_rows)


def test_unpermuted_rows_turn_half_split_rope_into_llama_cpps(key):
    """A query from the un-permuted rows rotated half-split is, row for row, llama.cpp's query from
    its stored rows rotated in interleaved pairs: the two conventions agree."""
    heads, dim, position = 2, 8, 7
    stored = np.asarray(jax.random.normal(key, (heads * dim, 6)), np.float64)
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (6,)), np.float64)
    hf = (gguf_file.unpermute_rope_rows(stored, heads) @ x).reshape(1, heads, dim)
    ours = reference.rope_half_split(hf, np.array([position]), 1e4)[0]
    theirs = np.stack([interleaved_rope64(row, position, 1e4) for row in (stored @ x).reshape(heads, dim)])
    np.testing.assert_allclose(llama_cpp_permute(ours.reshape(heads * dim, 1), heads)[:, 0], theirs.reshape(-1))


def test_unpermute_rope_rows_needs_even_heads():
    with pytest.raises(ValueError, match="a projection of 12 rows cannot hold 4 heads of even size"):
        gguf_file.unpermute_rope_rows(np.zeros((12, 3)), 4)


@pytest.mark.parametrize(
    ("gguf", "hf"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.12.ffn_norm.weight", "model.layers.12.post_attention_layernorm.weight"),
        ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj.weight"),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
    ],
)
def test_gguf_names_map_to_hugging_face_names(gguf, hf):
    assert gguf_file._hf_name(gguf) == hf


@pytest.mark.parametrize("name", ["blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q.weight"])
def test_unknown_gguf_names_are_errors(name):
    with pytest.raises(ValueError, match=rf"GGUF tensor '{name}' has no place in a Llama model"):
        gguf_file._hf_name(name)


@pytest.mark.parametrize(("pre", "digits"), [("smollm", [7, 8]), ("gpt2", [9])])
def test_gguf_tokenizer_merges_specials_and_digits(pre, digits):
    pytest.importorskip("tokenizers")
    tokens = ["a", "b", "ab", "Ġ", "Ġab", "<|im_start|>", "x", "1", "2", "12"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b", "Ġ ab", "1 2"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3, 1, 1, 1, 1],
    }
    tokenizer = gguf_file.build_tokenizer(metadata)
    # The control token is matched whole (never split into <, |, ...), "12" split by digit for smollm.
    assert tokenizer.encode("ab ab<|im_start|>12").ids == [2, 4, 5, *digits]
    assert tokenizer.decode([2, 4], skip_special_tokens=False) == "ab ab"
    with pytest.raises(NotImplementedError, match="only gpt2 BPE"):
        gguf_file.build_tokenizer({**metadata, "tokenizer.ggml.model": "llama"})


# llama.cpp's names of the Hugging Face tensors, spelled out from its convert script's tensor map.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    layer, module = hf.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def write_gguf(path, config: LlamaConfig, tensors: dict[str, np.ndarray]) -> None:
    """A float32 GGUF file as llama.cpp's convert script writes a Llama: its metadata keys, query
    and key rows permuted for interleaved RoPE, a byte-level BPE vocabulary of one merge."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", *(f"w{i}" for i in range(config.vocab_size - 3))])
    writer.add_token_merges(["a b"])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_eos_token_id(2)
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True])
def test_read_gguf_gives_back_the_hugging_face_tensors(tmp_path, tensors, tied):
    pytest.importorskip("tokenizers")
    write_gguf(tmp_path / "model.gguf", CONFIGS[tied], tensors[tied])
    model = gguf_file.read_gguf(tmp_path / "model.gguf")
    # The file stores eps as float32 and no head_dim (it is hidden / heads here).
    assert model.config == LlamaConfig(
        **{**SHAPE, "rms_norm_eps": float(np.float32(1e-5))}, tie_word_embeddings=tied, eos_token_id=2
    )
    assert sorted(model.tensors) == sorted(tensors[tied])
    for name, array in tensors[tied].items():
        reference.assert_bit_identical(model.tensors[name], array)
    assert model.tokenizer.encode("abba").ids == [2, 1, 0]


def test_gguf_metadata_the_model_cannot_run_is_refused(tmp_path, tensors):
    gguf = pytest.importorskip("gguf")
    write_gguf(tmp_path / "model.gguf", CONFIGS[False], tensors[False])
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    names = set(GGUF_NAMES.values())
    with pytest.raises(NotImplementedError, match="GGUF architecture 'qwen2': only 'llama'"):
        gguf_file._config({**metadata, "general.architecture": "qwen2"}, names)
    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        gguf_file._config({**metadata, "llama.rope.scaling.type": "linear"}, names)
    with pytest.raises(ValueError, match="the GGUF file has no llama.feed_forward_length"):
        gguf_file._config({k: v for k, v in metadata.items() if k != "llama.feed_forward_length"}, names)


# --- Hugging Face directories -------------------------------------------------------------------


def module_at(model, path: str):
    """The submodule at a "/"-joined module path (`layers/0/mlp/up_proj`)."""
    for part in path.split("/"):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def model_arrays(model) -> dict[str, np.ndarray]:
    """The float parameters of a model under Hugging Face names (`(N, K)` linear weights)."""
    config = model.config
    arrays = {"model.embed_tokens.weight": np.asarray(model.embed_tokens.embedding[...])}
    for path, prefix in {**norm_names(config), **linear_names(config)}.items():
        module = module_at(model, path)
        if isinstance(module, nnx.Linear):
            arrays[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(module.kernel[...]).T)
        elif not isinstance(module, Fp8Dense):
            arrays[f"{prefix}.weight"] = np.asarray(module.weight[...])
    return arrays


def fp8_layers(model) -> dict[str, Fp8Dense | nnx.Linear]:
    """Module path -> layer of every linear layer (`Fp8Dense` once converted)."""
    return {path: module_at(model, path) for path in linear_names(model.config)}


def test_linear_and_norm_names():
    untied, tied = linear_names(CONFIGS[False]), linear_names(CONFIGS[True])
    assert len(untied) == 3 * 7 + 1 and untied["lm_head"] == "lm_head" and "lm_head" not in tied
    assert untied["layers/2/mlp/down_proj"] == "model.layers.2.mlp.down_proj"
    assert norm_names(CONFIGS[False])["layers/1/post_attention_layernorm"] == "model.layers.1.post_attention_layernorm"
    assert len(norm_names(CONFIGS[False])) == 2 * 3 + 1


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_save_then_load_is_bit_exact(tmp_path, tensors, tied, dtype):
    saved = {name: array.astype(dtype) for name, array in tensors[tied].items()}
    directory = hf_checkpoint.save_llama(tmp_path / "model", CONFIGS[tied], saved)
    written = load_file(str(directory / "model.safetensors"))
    assert sorted(written) == sorted(saved)
    for name, array in saved.items():
        reference.assert_bit_identical(written[name], array)
    assert json.loads((directory / "config.json").read_text())["torch_dtype"] == np.dtype(dtype).name
    model = hf_checkpoint.load_llama(directory, dtype=jnp.dtype(dtype))
    assert model.config == CONFIGS[tied]
    loaded = model_arrays(model)
    assert sorted(loaded) == sorted(saved)
    for name, array in saved.items():
        reference.assert_bit_identical(loaded[name], array)


def test_load_llama_refuses_tensors_the_model_has_no_place_for(tmp_path, tensors):
    """`load_llama`'s docstring: "every tensor the model has no place for is an error". A query bias
    in a config without `attention_bias` would otherwise be dropped, changing the model silently."""
    extra = {**tensors[False], "model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}
    directory = hf_checkpoint.save_llama(tmp_path / "model", CONFIGS[False], extra)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        hf_checkpoint.load_llama(directory)


def test_load_llama_names_a_missing_tensor(tmp_path, tensors):
    missing = {k: v for k, v in tensors[False].items() if k != "model.layers.2.post_attention_layernorm.weight"}
    directory = hf_checkpoint.save_llama(tmp_path / "model", CONFIGS[False], missing)
    with pytest.raises(KeyError, match="'model.layers.2.post_attention_layernorm.weight' is not in the checkpoint"):
        hf_checkpoint.load_llama(directory)


def test_load_llama_refuses_an_lm_head_in_a_tied_checkpoint(tmp_path, tensors):
    directory = hf_checkpoint.save_llama(tmp_path / "model", CONFIGS[True], tensors[False])
    with pytest.raises(ValueError, match="config ties the LM head to the embedding, but the checkpoint holds lm_head"):
        hf_checkpoint.load_llama(directory)


def test_load_llama_names_a_tensor_of_the_wrong_shape(tmp_path, tensors):
    name = "model.layers.1.mlp.up_proj.weight"
    wrong = {**tensors[False], name: tensors[False][name][:-1]}
    directory = hf_checkpoint.save_llama(tmp_path / "model", CONFIGS[False], wrong)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(127, 64\), the model expects \(128, 64\)"):
        hf_checkpoint.load_llama(directory)


@pytest.mark.parametrize("name", list(schemes.SCHEMES))
def test_the_command_line_writes_what_the_converter_makes(tmp_path, tensors, float_model, calibration, quantized, name):
    assert schemes.SCHEMES[name].cli_options() == CLI_OPTIONS[name]
    source = hf_checkpoint.save_llama(tmp_path / "float", CONFIGS[False], tensors[False])
    options = CLI_OPTIONS[name]
    if schemes.SCHEMES[name].is_static:
        inputs = schemes.linear_inputs(float_model, calibration)
        assert sorted(inputs) == sorted(p for p in linear_names(CONFIGS[False]).values() if p != "lm_head")
        save_file(inputs, str(tmp_path / "inputs.safetensors"))
        options = [*options, "--calibrate", str(tmp_path / "inputs.safetensors")]
    assert cli.main(["quantize", str(source), str(tmp_path / "fp8"), *options, "--no-progress"]) == 0
    loaded = hf_checkpoint.load_llama(tmp_path / "fp8")
    in_memory = quantized(name)
    assert loaded.config == in_memory.config
    for path, layer in fp8_layers(in_memory).items():
        got = fp8_layers(loaded)[path]
        if path == "lm_head":  # left float by the schemes and by the command line
            assert isinstance(layer, nnx.Linear) and isinstance(got, nnx.Linear)
            reference.assert_bit_identical(got.kernel[...], layer.kernel[...])
            continue
        assert isinstance(got, Fp8Dense), (path, got)
        for field in ("weight_granularity", "activation_scheme", "block_size"):
            assert getattr(got.scheme, field) == getattr(layer.scheme, field), (path, field)
        reference.assert_bit_identical(got.weight[...], layer.weight[...])
        reference.assert_bit_identical(got.weight_scale[...], layer.weight_scale[...])
        assert (got.input_scale is None) == (layer.input_scale is None) == (not schemes.SCHEMES[name].is_static)
        if layer.input_scale is not None:
            reference.assert_bit_identical(got.input_scale[...], layer.input_scale[...])
    float_arrays = model_arrays(in_memory)
    for array_name, array in model_arrays(loaded).items():
        reference.assert_bit_identical(array, float_arrays[array_name])
    tokens = jnp.asarray([token_ids(5, LENGTH), token_ids(6, LENGTH)], jnp.int32)
    reference.assert_bit_identical(all_logits(loaded, tokens), all_logits(in_memory, tokens))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, NotImplementedError, "RoPE scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, NotImplementedError, "RoPE scaling"),
        ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act='gelu': only silu"),
        ({"attention_bias": True}, NotImplementedError, "biased attention"),
        ({"mlp_bias": True}, NotImplementedError, "biased attention or MLP"),
    ],
)
def test_from_hf_refuses_what_the_model_cannot_run(change, error, match):
    with pytest.raises(error, match=match):
        LlamaConfig.from_hf({**CONFIGS[False].to_hf(), **change})


@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_round_trips_through_from_hf(tied):
    config = LlamaConfig(**SHAPE, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    assert LlamaConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
    assert LlamaConfig.from_hf(CONFIGS[tied].to_hf("bfloat16")) == CONFIGS[tied]


def test_from_hf_fills_what_older_configs_leave_out():
    hf = {k: v for k, v in CONFIGS[False].to_hf().items() if k not in ("head_dim", "num_key_value_heads", "rope_theta")}
    older = {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "eos_token_id": [7, 8]}
    config = LlamaConfig.from_hf(older)
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta, config.eos_token_id) == (16, 4, 5e5, 7)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
        ({"head_dim": 15}, "head_dim=15 must be even"),
    ],
)
def test_config_checks_its_shape(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**SHAPE, **change})


# --- fp8 numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(schemes.SCHEMES))
def test_fp8_logits_are_close_to_the_float_models(float_model, quantized, name):
    model = quantized(name)
    layers = fp8_layers(model)
    assert isinstance(layers.pop("lm_head"), nnx.Linear)
    assert all(isinstance(layer, Fp8Dense) for layer in layers.values()) and len(layers) == 21
    assert isinstance(model.embed_tokens, nnx.Embed)
    tokens = jnp.asarray([token_ids(row + 30, LENGTH) for row in range(2)], jnp.int32)
    want = np.asarray(all_logits(float_model, tokens), np.float64)
    got = np.asarray(all_logits(model, tokens), np.float64)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    # e4m3 rounds each weight and activation by up to 2^-4 (RMS ~2^-4 / sqrt(3)), through 21
    # GEMMs and a random (untrained, so sensitive) model: measured 0.07-0.08 for every scheme.
    # Doubling the weight scale of a single one of the 21 layers gives 0.33, a transposed weight
    # or a wrong scale everywhere far more; an error ~0 would mean nothing was quantized.
    assert 1e-3 < error < 0.15, f"relative error {error:.3g} of {name} logits to the float model's"
