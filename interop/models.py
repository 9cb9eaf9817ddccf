"""Tiny random transformers models, built from configs (nothing is downloaded), and their float behaviour."""

import dataclasses

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 256
SEQUENCE = 16
CALIBRATION_SEED, EVAL_SEED = 1, 2


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One tiny model: `family` "llama", "bert" (`BertModel`) or "bert-mlm" (`BertForMaskedLM`)."""

    name: str
    family: str
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def auto_class(self):
        return {"llama": AutoModelForCausalLM, "bert": AutoModel, "bert-mlm": AutoModelForMaskedLM}[self.family]


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("llama-tied", "llama", tie_word_embeddings=True),
        ModelSpec("llama", "llama"),
        ModelSpec("llama-bf16", "llama", dtype=torch.bfloat16),
        ModelSpec("bert", "bert"),
        # Its decoder is a Linear tied to the word embeddings: absent from the checkpoint, like a tied lm_head.
        ModelSpec("bert-mlm", "bert-mlm", tie_word_embeddings=True),
    )
}


def build(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """The random model of `spec`, in eval mode and `spec.dtype`."""
    torch.manual_seed(seed)
    if spec.family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=spec.tie_word_embeddings,
        )
        model = LlamaForCausalLM(config)
    else:
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=spec.tie_word_embeddings,
            # At the default 0.02 the residual stream swamps the layers (the fp8 model's last hidden
            # state has cosine 1.00000 with the float one); at 0.1 a doubled scale shows (0.95).
            initializer_range=0.1,
        )
        model = (BertModel if spec.family == "bert" else BertForMaskedLM)(config)
    return model.to(spec.dtype).eval()


def token_ids(seed: int, batch: int = 4, sequence: int = SEQUENCE) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, sequence), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the model computes: logits, or BERT's last hidden state."""
    result = model(input_ids=ids)
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


@torch.no_grad()
def linear_io(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(inputs, outputs)` of every `nn.Linear` in one forward pass on `ids`, by module name."""
    inputs, outputs = {}, {}

    def hook(name):
        def record(module, args, result):
            inputs[name], outputs[name] = args[0].detach().clone(), result.detach().clone()

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs
