"""The JAX side of the interoperability tests; run with the JAX venv's python, never imported by them.

`python interop/jax_side.py dump CKPT OUT.safetensors [CKPT OUT.safetensors ...]` reads each fp8
checkpoint with `w8a8_jax.checkpoint` and writes what we make of it, every tensor float32 except
the codes:

  `{prefix}.weight`        the dequantized weight, `weight.astype(float32) * weight_scale`
  `{prefix}.weight_fp8`    the fp8 codes as uint8 (bit patterns of float8_e4m3fn)
  `{prefix}.weight_scale`  `(1,)` or `(N, 1)`, as we hold it
  `{prefix}.input_scale`   `(1,)`, static activations only
  `{prefix}.bias`          if the layer has one

with the metadata `config` (JSON: form, weight_granularity, activation_scheme, ignore) and
`layers` (JSON list of the fp8 layer prefixes). A checkpoint we cannot read gets no dump: its
error is printed and the exit status is 1, after the others are written.
"""

import json
import sys
import traceback

import numpy as np
from safetensors.numpy import save_file

from w8a8_jax import checkpoint


def dump(directory: str, output: str) -> None:
    """Writes the dump of one checkpoint (see the module docstring)."""
    ckpt = checkpoint.SafetensorsCheckpoint(directory)
    config = checkpoint.read_quantization_config(ckpt)
    tensors, layers = {}, []
    for layer in checkpoint.read_fp8_layers(ckpt, config):
        layers.append(layer.prefix)
        tensors[f"{layer.prefix}.weight"] = layer.weight.astype(np.float32) * layer.weight_scale
        tensors[f"{layer.prefix}.weight_fp8"] = layer.weight.view(np.uint8)
        tensors[f"{layer.prefix}.weight_scale"] = layer.weight_scale
        if layer.input_scale is not None:
            tensors[f"{layer.prefix}.input_scale"] = layer.input_scale
        if layer.bias is not None:
            tensors[f"{layer.prefix}.bias"] = layer.bias.astype(np.float32)
    summary = {
        "form": config.form,
        "weight_granularity": config.weight_granularity,
        "activation_scheme": config.activation_scheme,
        "ignore": list(config.ignore),
    }
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(tensors, output, metadata={"config": json.dumps(summary), "layers": json.dumps(layers)})


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "dump" or len(argv) % 2 == 0:
        print(__doc__, file=sys.stderr)
        return 2
    status = 0
    for directory, output in zip(argv[1::2], argv[2::2]):
        try:
            dump(directory, output)
        except Exception:
            print(f"jax_side dump {directory}: failed\n{traceback.format_exc()}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
