"""Finding and replacing layers in Flax models: nnx module graphs and linen parameter trees."""

from collections.abc import Iterator, Sequence
from typing import Any

from flax import nnx


def layer_path(path_keys: Sequence[Any]) -> str:
    """The "/"-joined module path of an nnx node (e.g. "layers/0/attn/qkv")."""
    return "/".join(str(key) for key in path_keys)


def find_layers(model: nnx.Module, types: tuple[type, ...]) -> Iterator[tuple[str, tuple, Any]]:
    """`(path, path_keys, node)` of every node of `types` below the root of `model`."""
    for path_keys, node in nnx.iter_graph(model):
        if isinstance(node, types) and path_keys:
            yield layer_path(path_keys), tuple(path_keys), node


def child(parent, key):
    """`parent[key]` for a list index, else the attribute `key`."""
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def parent_of(model: nnx.Module, path_keys: Sequence[Any]):
    """The node holding the node at `path_keys`."""
    parent = model
    for key in path_keys[:-1]:
        parent = child(parent, key)
    return parent


def set_child(parent, key, value) -> None:
    """`parent[key] = value` for a list index, else sets the attribute `key`."""
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def tree_get(tree, keys):
    """The entry of the nested dict `tree` at `keys`."""
    for key in keys:
        tree = tree[key]
    return tree


def tree_set(tree: dict, keys, value) -> dict:
    """A copy of the nested dict `tree` with `value` at `keys` (the rest shared)."""
    if not keys:
        return value
    tree = dict(tree)
    tree[keys[0]] = tree_set(tree[keys[0]], keys[1:], value)
    return tree
