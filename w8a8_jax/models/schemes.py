"""The fp8 schemes a `Llama` runs in, by name: converter rules in memory, `w8a8-jax quantize` options
for a checkpoint, and the per-layer inputs that calibrate static activation scales.

Every linear layer of the decoder layers is quantized; the embedding, the norms and the LM head
(tied or not) stay float, as `w8a8-jax quantize` leaves them by default.
"""

import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import convert, module_tree
from w8a8_jax.models.llama import KVCache, Llama, linear_names
from w8a8_jax.nnx import Fp8Dense
from w8a8_jax.scheme import Fp8Scheme

# The module paths the schemes quantize (`convert.QuantizationRule.module_path`).
DECODER_LINEARS = r"layers/\d+/(self_attn|mlp)/\w+_proj"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One named scheme: `weights` and `activations` by the command line's short names."""

    weights: str
    activations: str

    @property
    def is_static(self) -> bool:
        return self.activations == "static"

    def rule(self) -> convert.QuantizationRule:
        """The converter rule that quantizes the decoder layers' linear layers in this scheme."""
        return convert.QuantizationRule(DECODER_LINEARS, scheme=Fp8Scheme.from_names(self.weights, self.activations))

    def cli_options(self) -> list[str]:
        """The `w8a8-jax quantize` options that write a checkpoint in this scheme (static ones also
        need `--calibrate`)."""
        return ["--weights", self.weights, "--activations", self.activations]


SCHEMES = {
    "channel-token": Scheme("channel", "dynamic-token"),  # per-channel weights, dynamic per-token activations
    "tensor-static": Scheme("tensor", "static"),  # per-tensor weights, calibrated static activations
    "block": Scheme("block", "dynamic-group"),  # 128x128 weight blocks, per-token groups of 128
}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


def calibration_batches(token_ids: Sequence[int], length: int = 128) -> list[np.ndarray]:
    """Consecutive `(1, length)` int32 chunks of a text's tokens (the last, shorter one dropped
    unless it is the only one)."""
    ids = np.asarray(token_ids, np.int32)
    chunks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)] or [ids]
    return [chunk[None] for chunk in chunks]


def forward(model: Llama, tokens: np.ndarray):
    """The model on one `(B, T)` batch from position 0, with a cache of exactly `T` positions."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache = KVCache.create(model.config, batch, length, model.embed_tokens.embedding[...].dtype)
    return model(jnp.asarray(tokens), positions, cache, jnp.zeros(batch, jnp.int32))


def quantize(model: Llama, name: str, calibration: Iterable[np.ndarray] = ()) -> convert.QuantizationReport:
    """Converts `model` in place to the scheme `name`; static schemes calibrate on `calibration`
    batches (`(1, T)` token ids), which also fill the per-layer report."""
    return convert.quantize_nnx(model, [scheme(name).rule()], calibration_data=calibration, forward=forward)


def linear_inputs(model: Llama, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Each linear layer's float32 inputs `(tokens, K)` over `batches`, keyed by checkpoint prefix:
    the `--calibrate` data of `w8a8-jax quantize` (and `report --inputs`)."""
    names = linear_names(model.config)
    captured = {path: [] for path in names}
    originals = {}
    for path, path_keys, layer in module_tree.find_layers(model, (nnx.Linear, Fp8Dense)):
        if path in names:
            originals[path] = (module_tree.parent_of(model, path_keys), path_keys[-1], layer)

    def recorder(path, layer):
        def record(x):
            captured[path].append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
            return layer(x)

        return record

    for path, (parent, key, layer) in originals.items():
        module_tree.set_child(parent, key, recorder(path, layer))
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for parent, key, layer in originals.values():
            module_tree.set_child(parent, key, layer)
    return {names[path]: np.concatenate(inputs) for path, inputs in captured.items() if inputs}
