"""FP8 checkpoints onto Flax modules and back, by name.

A name map takes a module path ("/"-joined, as `convert` names layers, e.g.
"encoder/layers/0/attention/qkv") to its checkpoint prefix ("encoder.layer.0.attention.self.query"),
or, for a fused projection (QKV, gate/up), to the list of its shards' prefixes in output order.
Without a map a path maps to itself with "/" replaced by ".". Fused shards are stored separately,
each with its own scales, and fused on load as vLLM does (`weight_utils.fuse_fp8_shards`: per-tensor
scales become their max and the shards are requantized to it; per-channel scales concatenate;
`weight_utils.fuse_block_fp8_shards`: block codes and scales concatenate, every shard but the last
spanning whole blocks); their static `input_scale`s become their max.
"""

from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w8a8_jax import dtypes, module_tree, platform, weight_utils
from w8a8_jax import nnx as fp8_nnx
from w8a8_jax.checkpoint.config import QuantizationConfig
from w8a8_jax.checkpoint.layers import Fp8LayerTensors, fp8_layer_prefixes, read_fp8_layer, read_quantization_config
from w8a8_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from w8a8_jax.convert.linen import LinenFp8Model
from w8a8_jax.params import Fp8Params

NameMap = Mapping[str, str | Sequence[str]]


def _prefixes(names: NameMap | None, path: str) -> list[str]:
    if names is None:
        return [path.replace("/", ".")]
    target = names[path]
    return [target] if isinstance(target, str) else list(target)


def fused_params(
    checkpoint: SafetensorsCheckpoint, prefixes: Sequence[str], config: QuantizationConfig, fp8_dtype=None
) -> Fp8Params:
    """The `Fp8Dense` parameters of one layer stored under `prefixes` (one, or a fused layer's shards)."""
    return _fuse([read_fp8_layer(checkpoint, prefix, config) for prefix in prefixes], config, fp8_dtype)


def _module_params(
    checkpoint: SafetensorsCheckpoint,
    prefixes: Sequence[str],
    config: QuantizationConfig,
    fp8_dtype,
    *,
    path: str,
    has_bias: bool,
) -> Fp8Params:
    """`fused_params` for the module at `path`: every shard must have a bias exactly if the module has one."""
    layers = [read_fp8_layer(checkpoint, prefix, config) for prefix in prefixes]
    for layer in layers:
        bias_name = f"{layer.prefix}.bias"
        if has_bias and layer.bias is None:
            raise ValueError(f"missing tensor {bias_name!r}: the module at {path!r} has a bias")
        if not has_bias and layer.bias is not None:
            raise ValueError(f"unexpected tensor {bias_name!r}: the module at {path!r} has no bias")
    return _fuse(layers, config, fp8_dtype)


def _fuse(layers: Sequence[Fp8LayerTensors], config: QuantizationConfig, fp8_dtype) -> Fp8Params:
    """One layer's `Fp8Dense` parameters from its shards' validated tensors (one shard: unchanged)."""
    prefixes = [layer.prefix for layer in layers]
    widths = {layer.weight.shape[1] for layer in layers}
    if len(widths) != 1:
        raise ValueError(f"fused shards {list(prefixes)} have different K: {[layer.weight.shape for layer in layers]}")
    if len({layer.bias is None for layer in layers}) != 1:
        raise ValueError(f"fused shards {list(prefixes)}: some have a bias and some do not")
    if len(layers) == 1:
        params = layers[0].params()
    else:
        shards = [(jnp.asarray(layer.weight), jnp.asarray(layer.weight_scale)) for layer in layers]
        if config.is_block:
            try:
                weight, weight_scale = weight_utils.fuse_block_fp8_shards(shards, config.block_size)
            except ValueError as error:
                raise ValueError(f"fused shards {prefixes}: {error}") from None
        else:
            weight, weight_scale = weight_utils.fuse_fp8_shards(shards, config.weight_granularity)
        input_scale = None
        if config.is_static:
            input_scale = jnp.max(jnp.stack([jnp.asarray(layer.input_scale) for layer in layers])).reshape(1)
        bias = None
        if layers[0].bias is not None:
            bias = jnp.concatenate([jnp.asarray(layer.bias) for layer in layers])
        params = Fp8Params.create(weight, weight_scale, input_scale, bias, block_size=config.block_size)
    if platform.resolve_fp8_dtype(fp8_dtype) == np.dtype(dtypes.FP8_E4M3FNUZ):
        weight, weight_scale, input_scale = weight_utils.normalize_e4m3fn_to_e4m3fnuz(
            params.weight, params.weight_scale, params.input_scale
        )
        params = Fp8Params.create(weight, weight_scale, input_scale, params.bias, block_size=config.block_size)
    return params


def _open(checkpoint) -> SafetensorsCheckpoint:
    return checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)


def load_nnx(
    model: nnx.Module,
    checkpoint,
    names: NameMap | None = None,
    *,
    config: QuantizationConfig | None = None,
    fp8_dtype=None,
    strict: bool = True,
) -> list[str]:
    """Puts a checkpoint's fp8 layers into `model` in place: each `nnx.Linear` or `Fp8Dense` at a
    path in `names` (all of them when `names` is None) becomes an `Fp8Dense` holding the
    checkpoint's tensors; its output dtype is kept. The checkpoint must hold a bias for every
    shard of a layer exactly when the module has one.

    Every layer is read and checked before the model is touched, so an error leaves `model` as it
    was. With `strict` (default) every fp8 layer of the checkpoint must go into a module: one
    left over is a ValueError naming it. Returns the replaced paths.
    """
    checkpoint = _open(checkpoint)
    config = config or read_quantization_config(checkpoint)
    targets = [
        (path, path_keys, node)
        for path, path_keys, node in module_tree.find_layers(model, (nnx.Linear, fp8_nnx.Fp8Dense))
        if names is None or path in names
    ]
    if names is not None:
        unknown = sorted(set(names) - {path for path, _, _ in targets})
        if unknown:
            raise ValueError(f"no nnx.Linear or Fp8Dense at module paths {unknown}")
    layers = {}
    for path, _, node in targets:
        params = _module_params(
            checkpoint, _prefixes(names, path), config, fp8_dtype, path=path, has_bias=node.bias is not None
        )
        out_features, in_features = params.weight.shape
        expected = (node.in_features, node.out_features)
        if (in_features, out_features) != expected:
            raise ValueError(
                f"{path}: checkpoint {_prefixes(names, path)} holds (K, N) = {(in_features, out_features)}, "
                f"the module has {expected}"
            )
        layers[path] = fp8_nnx._stand_in(params, scheme=config.scheme, layer=node)
    if strict:
        _check_all_loaded(checkpoint, [prefix for path, _, _ in targets for prefix in _prefixes(names, path)])
    for path, path_keys, _ in targets:
        module_tree.set_child(module_tree.parent_of(model, path_keys), path_keys[-1], layers[path])
    return [path for path, _, _ in targets]


def _check_all_loaded(checkpoint: SafetensorsCheckpoint, loaded: Sequence[str]) -> None:
    left = sorted(set(fp8_layer_prefixes(checkpoint)) - set(loaded))
    if left:
        raise ValueError(
            f"{len(left)} fp8 layer(s) of the checkpoint match no module: {left[:5]}; map them with names= "
            "(or pass strict=False to leave them out)"
        )


def _dense_paths(params, keys=()) -> Iterator[tuple[str, ...]]:
    if isinstance(params, Mapping):
        if "kernel" in params or "weight" in params:
            yield keys
        else:
            for key, child in params.items():
                yield from _dense_paths(child, (*keys, key))


def load_linen(
    model: nn.Module,
    variables: dict,
    checkpoint,
    names: NameMap | None = None,
    *,
    config: QuantizationConfig | None = None,
    fp8_dtype=None,
    strict: bool = True,
) -> tuple[LinenFp8Model, dict]:
    """A linen model's float variables with its `nn.Dense` layers' params replaced from a checkpoint.

    Each `nn.Dense` params entry (`{"kernel", "bias"}`) at a path in `names` (default: every entry
    with a "kernel") becomes `{"weight", "weight_scale", "input_scale"?, "bias"?}`; the checkpoint
    must hold a bias for every shard exactly when the entry has one. Every layer is read and checked
    before anything is returned; with `strict` (default) every fp8 layer of the checkpoint must
    be used. Returns `(fp8_model, fp8_variables)`; run with `fp8_model.apply(fp8_variables, ...)`.
    `variables` is not modified.
    """
    checkpoint = _open(checkpoint)
    config = config or read_quantization_config(checkpoint)
    params = variables["params"]
    paths = {"/".join(keys): keys for keys in _dense_paths(params)}
    selected = list(paths) if names is None else list(names)
    unknown = sorted(set(selected) - set(paths))
    if unknown:
        raise ValueError(f"no Dense params at paths {unknown}")
    new_params = params
    for path in selected:
        layer = module_tree.tree_get(params, paths[path])
        fp8 = _module_params(checkpoint, _prefixes(names, path), config, fp8_dtype, path=path, has_bias="bias" in layer)
        if "kernel" in layer and tuple(layer["kernel"].shape) != tuple(fp8.weight.shape[::-1]):
            raise ValueError(
                f"{path}: checkpoint {_prefixes(names, path)} holds (K, N) = {tuple(fp8.weight.shape[::-1])}, "
                f"the model has {tuple(layer['kernel'].shape)}"
            )
        new_params = module_tree.tree_set(new_params, paths[path], fp8.to_dict())
    if strict:
        _check_all_loaded(checkpoint, [prefix for path in selected for prefix in _prefixes(names, path)])
    fp8_model = LinenFp8Model(model, dict.fromkeys(selected, config.scheme))
    return fp8_model, {**variables, "params": new_params}


def _split(
    params: Fp8Params,
    prefixes: Sequence[str],
    widths: Sequence[int] | None,
    *,
    block_size: tuple[int, int] | None = None,
    scale_name: str = "weight_scale",
):
    """One layer's parameters as checkpoint tensors, split into its shards' rows for a fused layer.

    Block scales `(ceil(N / bn), ceil(K / bk))` split by block rows, so every shard but the last
    must span whole blocks; the weight scale is written as `{prefix}.{scale_name}`.
    """
    weight = np.asarray(params.weight)
    if np.dtype(weight.dtype) != np.dtype(dtypes.FP8_E4M3FN):
        raise TypeError(f"checkpoints hold float8_e4m3fn weights, {prefixes} is {weight.dtype}")
    if len(prefixes) > 1 and (widths is None or sum(widths) != weight.shape[0]):
        raise ValueError(
            f"fused layer {list(prefixes)} needs shard widths summing to N={weight.shape[0]}, got {widths}"
        )
    bounds = np.cumsum([0, *(widths or [weight.shape[0]])])
    if block_size is not None and any(bound % block_size[0] for bound in bounds[1:-1]):
        raise ValueError(
            f"fused block layer {list(prefixes)}: shard widths {list(widths)} must be multiples of the block's "
            f"bn={block_size[0]} (but the last), or a shard would share a block scale with the next"
        )
    scale = np.asarray(params.weight_scale, np.float32)
    for prefix, start, stop in zip(prefixes, bounds[:-1], bounds[1:]):
        yield f"{prefix}.weight", weight[start:stop]
        if block_size is not None:
            bn = block_size[0]
            yield f"{prefix}.{scale_name}", scale[start // bn : -(-stop // bn)]
        else:
            yield f"{prefix}.{scale_name}", scale if scale.size == 1 else scale[start:stop]
        if params.input_scale is not None:
            yield f"{prefix}.input_scale", np.asarray(params.input_scale, np.float32)
        if params.bias is not None:
            yield f"{prefix}.bias", np.asarray(params.bias)[start:stop]


def _check_layer_scheme(path: str, scheme, config: QuantizationConfig | None) -> None:
    """A layer written under `config` must be quantized as `config` says (a loader reads it so)."""
    if config is None:
        return
    mine = (scheme.weight_granularity, scheme.activation_scheme, scheme.block_size)
    theirs = (config.weight_granularity, config.activation_scheme, config.block_size)
    if mine != theirs:
        raise ValueError(
            f"the layer at {path!r} is quantized as (weights, activations, block_size) = {mine}, but the "
            f"checkpoint's quantization_config says {theirs}"
        )


def nnx_fp8_tensors(
    model: nnx.Module,
    names: NameMap | None = None,
    shard_widths: Mapping[str, Sequence[int]] | None = None,
    *,
    config: QuantizationConfig | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors of every `Fp8Dense` in `model` (for `write_checkpoint`).

    A fused layer (several prefixes in `names`) is split into its shards by `shard_widths[path]`;
    every shard keeps the fused layer's scales (block scales: its own block rows), so loading it
    back reproduces the layer exactly. `config`, the `quantization_config` the tensors are written
    under, names the weight scale (`weight_scale_inv` for the fp8 form's block weights) and must
    describe every layer's scheme; None writes the compressed-tensors names unchecked.
    """
    scale_name = "weight_scale" if config is None else config.weight_scale_name
    for path, _, node in module_tree.find_layers(model, (fp8_nnx.Fp8Dense,)):
        if names is None or path in names:
            _check_layer_scheme(path, node.scheme, config)
            yield from _split(
                node.params,
                _prefixes(names, path),
                (shard_widths or {}).get(path),
                block_size=node.scheme.block_size,
                scale_name=scale_name,
            )


def linen_fp8_tensors(
    params: Mapping,
    names: NameMap | None = None,
    shard_widths: Mapping[str, Sequence[int]] | None = None,
    *,
    config: QuantizationConfig | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors of every fp8 layer (a params entry with "weight_scale") in a linen tree.

    A linen params entry does not say its scheme: `config` does (block layers need it: their
    `block_size`, and the scale's name in the fp8 form); None reads the entries as per-tensor or
    per-channel.
    """
    block_size = None if config is None else config.block_size
    scale_name = "weight_scale" if config is None else config.weight_scale_name
    for keys in _dense_paths(params):
        layer = module_tree.tree_get(params, keys)
        path = "/".join(keys)
        if "weight_scale" in layer and (names is None or path in names):
            yield from _split(
                Fp8Params.from_dict(layer, block_size=block_size),
                _prefixes(names, path),
                (shard_widths or {}).get(path),
                block_size=block_size,
                scale_name=scale_name,
            )
