"""The JAX side of the interoperability tests; run with the JAX venv's python, never imported by them.

`python interop/jax_side.py dump CKPT OUT.safetensors [CKPT OUT.safetensors ...]` reads each fp8
checkpoint with `w8a8_jax.checkpoint` and writes what we make of it, every tensor float32 except
the codes:

  `{prefix}.weight`        the dequantized weight: each code times its scale (the tensor's, its
                           row's or its block's), one float32 product
  `{prefix}.weight_fp8`    the fp8 codes as uint8 (bit patterns of float8_e4m3fn)
  `{prefix}.weight_scale`  `(1,)`, `(N, 1)` or `(ceil(N / bn), ceil(K / bk))`, as we hold it
                           (whatever the checkpoint names it)
  `{prefix}.input_scale`   `(1,)`, static activations only
  `{prefix}.bias`          if the layer has one

with the metadata `config` (JSON: form, weight_granularity, activation_scheme, block_size, ignore)
and `layers` (JSON list of the fp8 layer prefixes). A checkpoint we cannot read gets no dump: its
error is printed and the exit status is 1, after the others are written.

`python interop/jax_side.py serve CKPT` runs the checkpoint's fp8 layers as our layer call
(`dense.fp8_dense`: `W8A8BlockFp8LinearOp` for block weights) on request: each stdin line
`PREFIX IN.safetensors OUT.safetensors` reads the input `x (..., K)` float32 from IN, writes the
layer's float32 output `y (..., N)` to OUT and answers `ok` (or `error: ...`) on one stdout line.
"""

import json
import sys
import traceback

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from w8a8_jax import checkpoint, dense


def dump(directory: str, output: str) -> None:
    """Writes the dump of one checkpoint (see the module docstring)."""
    ckpt = checkpoint.SafetensorsCheckpoint(directory)
    config = checkpoint.read_quantization_config(ckpt)
    tensors, layers = {}, []
    for layer in checkpoint.read_fp8_layers(ckpt, config):
        layers.append(layer.prefix)
        tensors[f"{layer.prefix}.weight"] = layer.dequantized()
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
        "block_size": None if config.block_size is None else list(config.block_size),
        "ignore": list(config.ignore),
    }
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(tensors, output, metadata={"config": json.dumps(summary), "layers": json.dumps(layers)})


def serve(directory: str) -> int:
    """Answers layer requests on stdin until it closes (see the module docstring)."""
    ckpt = checkpoint.SafetensorsCheckpoint(directory)
    config = checkpoint.read_quantization_config(ckpt)
    params = {layer.prefix: layer.params() for layer in checkpoint.read_fp8_layers(ckpt, config)}
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            prefix, source, target = line.split()
            x = jnp.asarray(load_file(source)["x"])
            y = dense.fp8_dense(x, params[prefix], scheme=config.scheme, out_dtype=jnp.float32)
            save_file({"y": np.ascontiguousarray(np.asarray(y))}, target)
            answer = "ok"
        except Exception as error:  # the caller fails the test with it; the worker keeps serving
            answer = f"error: {type(error).__name__}: {error}".replace("\n", " ")
        print(answer, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        return serve(argv[1])
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
