"""Text generation with a `Llama`: a jitted prefill per prompt-length bucket, a jitted decode step.

`Generator` splits the model once into its graph and state and compiles two functions of the state:
the prefill runs a batch of right-padded prompts `(B, bucket)` into a fresh KV cache, the decode step
runs one token per sequence at its own position. The cache has a fixed length, so a batch size
compiles the decode step once and each prompt bucket the prefill once, whatever the prompts.
"""

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax.models.llama import KVCache, Llama

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens `(B,)` int32 from float32 `logits (B, V)`: the argmax where `temperature` is 0,
    else a draw from the smallest set of most likely tokens whose probability reaches `top_p`
    (nucleus sampling) of `softmax(logits / temperature)`."""

    def draw(logits):
        scaled = logits / temperature
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        # A token stays when the tokens ranked above it hold less than top_p: the first always does.
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32), logits)


@dataclasses.dataclass
class Generation:
    """What `Generator.generate` made: the new tokens of each prompt (up to, not including, a stop
    token) and the wall-clock seconds of the prefill and of the decode steps."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second times the batch: the tokens a step makes, stopped rows included."""
        return self.decode_steps * len(self.tokens) / self.decode_seconds if self.decode_seconds else 0.0


class Generator:
    """Jitted prefill and decode for a `Llama` (float, or with `Fp8Dense` layers).

    >>> generator = Generator(model, cache_length=512)  # doctest: +SKIP
    >>> generator.generate([[1, 2, 3], [4, 5]], max_new_tokens=8).tokens  # doctest: +SKIP

    Args:
      model: the decoder; its current weights are captured (split once) here.
      cache_length: the positions the KV cache holds: a prompt's bucket and its prompt plus new
        tokens must fit (default 1024).
      buckets: the prompt lengths the prefill compiles for; a prompt is right-padded to the smallest
        that holds it (default powers of two from 16 to 4096).
      cache_dtype: dtype of the cached keys and values (default the embedding's dtype).
      pad_id: the token that pads prompts (default 0); padding is masked, its value never matters.
    """

    def __init__(
        self,
        model: Llama,
        *,
        cache_length: int = 1024,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        cache_dtype=None,
        pad_id: int = 0,
    ):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        # The state as a flat list: jit's C++ dispatch flattens a list at once, where an nnx State
        # costs Python calls per node on every step.
        self._leaves, self._treedef = jax.tree.flatten(self.state)
        self.cache_length = cache_length
        self.buckets = tuple(sorted(bucket for bucket in buckets if bucket <= cache_length))
        if not self.buckets:
            raise ValueError(f"no bucket of {tuple(buckets)} fits cache_length={cache_length}")
        self.cache_dtype = cache_dtype or model.embed_tokens.embedding[...].dtype
        self.pad_id = pad_id
        self.compiles = Counter()  # traces per function: one per compile
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn, donate_argnames=("keys", "values"))
        self._score = jax.jit(self._score_fn)

    def _model(self, leaves) -> Llama:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))

    def _prefill_fn(self, leaves, tokens, lengths, sampling):
        self.compiles["prefill"] += 1
        model = self._model(leaves)
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cache = KVCache.create(self.config, batch, self.cache_length, self.cache_dtype)
        hidden, cache = model(tokens, positions, cache, jnp.zeros(batch, jnp.int32))
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        logits = model.logits(last)
        key, temperature, top_p = sampling
        return sample(logits, jax.random.fold_in(key, 0), temperature, top_p), logits, cache.keys, cache.values

    def _decode_fn(self, leaves, tokens, positions, keys, values, sampling, step):
        self.compiles["decode"] += 1
        model = self._model(leaves)
        hidden, cache = model(tokens[:, None], positions[:, None], KVCache(keys, values), positions)
        logits = model.logits(hidden[:, 0])
        key, temperature, top_p = sampling
        tokens = sample(logits, jax.random.fold_in(key, step), temperature, top_p)
        return tokens, positions + 1, logits, cache.keys, cache.values

    def _score_fn(self, leaves, tokens, targets):
        self.compiles["score"] += 1
        model = self._model(leaves)
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cache = KVCache.create(self.config, batch, length, self.cache_dtype)
        hidden, _ = model(tokens, positions, cache, jnp.zeros(batch, jnp.int32))
        logits = model.logits(hidden)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, axis=-1)

    @staticmethod
    def _sampling(key, temperature: float, top_p: float):
        """`(key, temperature, top_p)` as the jitted steps take them; a step draws with
        `fold_in(key, step)` (the prefill is step 0)."""
        return jax.random.key(0) if key is None else key, jnp.float32(temperature), jnp.float32(top_p)

    def bucket(self, length: int) -> int:
        """The prefill length of a prompt of `length` tokens."""
        for bucket in self.buckets:
            if bucket >= length:
                return bucket
        raise ValueError(f"a prompt of {length} tokens exceeds the largest bucket {self.buckets[-1]}")

    def _prompt_batch(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """`(tokens (B, bucket) right-padded, lengths (B,))` int32."""
        lengths = np.array([len(prompt) for prompt in prompts], np.int32)
        if not len(prompts) or lengths.min() < 1:
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        tokens = np.full((len(prompts), self.bucket(int(lengths.max()))), self.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
        return tokens, lengths

    def prefill(self, prompts: Sequence[Sequence[int]], *, key=None, temperature=0.0, top_p=1.0):
        """Runs `prompts` into a fresh cache: `(first new tokens (B,), their logits (B, V), cache)`."""
        token, logits, keys, values = self._prefill(
            self._leaves, *self._prompt_batch(prompts), self._sampling(key, temperature, top_p)
        )
        return token, logits, KVCache(keys, values)

    def decode(self, tokens, positions, cache: KVCache, *, key=None, temperature=0.0, top_p=1.0, step=1):
        """One step: `tokens (B,)` at `positions (B,)` -> `(next tokens (B,), logits (B, V), cache)`;
        `cache` is donated (its buffers are reused). Draws with `fold_in(key, step)`."""
        tokens, _, logits, keys, values = self._decode(
            self._leaves,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            cache.keys,
            cache.values,
            self._sampling(key, temperature, top_p),
            step,
        )
        return tokens, logits, KVCache(keys, values)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
    ) -> Generation:
        """Up to `max_new_tokens` new tokens per prompt, greedy (`temperature=0`, default) or sampled
        with `temperature` and `top_p`; a row stops at a token of `stop_ids` (default the config's
        eos). Prompts may differ in length: each decodes at its own positions."""
        if not len(prompts) or min(len(prompt) for prompt in prompts) < 1:
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        longest = max(len(prompt) for prompt in prompts)
        if longest + max_new_tokens > self.cache_length:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"cache_length={self.cache_length}"
            )
        eos = self.config.eos_token_id
        stops = set(stop_ids if stop_ids is not None else ([] if eos is None else [eos]))
        sampling = self._sampling(jax.random.key(seed), temperature, top_p)
        start = time.perf_counter()
        token, _, keys, values = self._prefill(self._leaves, *self._prompt_batch(prompts), sampling)
        token_host = np.asarray(token)
        prefill_seconds = time.perf_counter() - start
        positions = jnp.asarray([len(prompt) for prompt in prompts], jnp.int32)
        outputs = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        steps, start = 0, time.perf_counter()
        for step in range(max_new_tokens):
            for row in np.flatnonzero(~done):
                if int(token_host[row]) in stops:
                    done[row] = True
                else:
                    outputs[row].append(int(token_host[row]))
            if done.all() or step == max_new_tokens - 1:
                break
            token, positions, _, keys, values = self._decode(
                self._leaves, token, positions, keys, values, sampling, step + 1
            )
            token_host = np.asarray(token)
            steps += 1
        return Generation(outputs, prefill_seconds, time.perf_counter() - start, steps)

    def score(self, token_ids: Sequence[int], window: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced next-token scores of a text: `(log p(token[i + 1] | window context) (n - 1,),
        argmax prediction (n - 1,))` in float32 / int32, over consecutive windows of `window`
        tokens (each starts without context; the last is padded)."""
        ids = np.asarray(token_ids, np.int32)
        if ids.ndim != 1 or len(ids) < 2:
            raise ValueError(f"token_ids must be a 1-D sequence of at least 2 tokens, got shape {ids.shape}")
        logprobs, predictions = [], []
        for begin in range(0, len(ids) - 1, window):
            inputs = ids[begin : begin + window]
            targets = ids[begin + 1 : begin + window + 1]
            used = len(targets)
            padded_inputs = np.full((1, window), self.pad_id, np.int32)
            padded_targets = np.zeros((1, window), np.int32)
            padded_inputs[0, : len(inputs)] = inputs
            padded_targets[0, :used] = targets
            logprob, prediction = self._score(self._leaves, padded_inputs, padded_targets)
            logprobs.append(np.asarray(logprob)[0, :used])
            predictions.append(np.asarray(prediction)[0, :used])
        return np.concatenate(logprobs), np.concatenate(predictions).astype(np.int32)


def perplexity(logprobs: np.ndarray) -> float:
    """`exp(-mean(log p))` of per-token log-probabilities."""
    return float(np.exp(-np.mean(np.asarray(logprobs, np.float64))))
