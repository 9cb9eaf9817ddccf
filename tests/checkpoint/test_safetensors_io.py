"""Safetensors I/O: round trips for every scheme, shards and index, atomic writes, corrupt files."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from tests.checkpoint.conftest import random_float
from w8a8_jax.checkpoint import (
    CheckpointWriter,
    QuantizationConfig,
    SafetensorsCheckpoint,
    quantize_linear,
    write_checkpoint,
)

SCHEMES = [(g, a) for g in ("per_tensor", "per_channel") for a in ("static", "dynamic_per_tensor", "dynamic_per_token")]


def assert_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (NaN-proof, exact)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert np.asarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


@pytest.mark.parametrize("granularity,scheme", SCHEMES)
def test_round_trip_every_scheme(tmp_path, rng, granularity, scheme):
    config = QuantizationConfig(granularity, scheme)
    tensors = {}
    for i, (n, k) in enumerate([(48, 32), (17, 96)]):
        layer = quantize_linear(random_float(rng, (n, k)), config, input_amax=float(rng.uniform(1, 8)))
        tensors.update({f"layers.{i}.proj.{key}": value for key, value in layer.items()})
        tensors[f"layers.{i}.proj.bias"] = random_float(rng, (n,)).astype(ml_dtypes.bfloat16)
    tensors["embed.weight"] = random_float(rng, (11, 32)).astype(np.float16)
    tensors["position_ids"] = np.arange(1, 9, dtype=np.int64)
    write_checkpoint(tmp_path / "ckpt", tensors, config={"quantization_config": config.to_dict()})
    loaded = SafetensorsCheckpoint(tmp_path / "ckpt")
    assert loaded.names == sorted(tensors)
    assert QuantizationConfig.from_dict(loaded.config["quantization_config"]) == config
    for name, expected in tensors.items():
        assert_identical(loaded.tensor(name), expected)
    assert loaded.dtype_name("layers.0.proj.weight") == "F8_E4M3"


def test_sharded_round_trip_with_index(tmp_path, rng):
    tensors = {f"t{i}": random_float(rng, (64, 16)) for i in range(5)}  # 4 KiB each
    write_checkpoint(tmp_path / "ckpt", tensors, max_shard_bytes=9000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 16 * 4
    assert sorted(index["weight_map"]) == sorted(tensors)
    loaded = SafetensorsCheckpoint(tmp_path / "ckpt")
    assert len(loaded.files) == 3
    for name, expected in tensors.items():
        assert_identical(loaded.tensor(name), expected)


def test_failed_write_leaves_nothing(tmp_path, rng):
    with (
        pytest.raises(RuntimeError, match="interrupted"),
        CheckpointWriter(tmp_path / "ckpt", max_shard_bytes=100) as writer,
    ):
        writer.add("a", random_float(rng, (8, 8)))
        writer.add("b", random_float(rng, (8, 8)))  # the first shard is on disk by now
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(tmp_path, rng):
    write_checkpoint(tmp_path / "ckpt", {"a": random_float(rng, (4,))})
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint(tmp_path / "ckpt", {"b": random_float(rng, (4,))})
    replacement = random_float(rng, (4,))
    write_checkpoint(tmp_path / "ckpt", {"b": replacement}, overwrite=True)
    loaded = SafetensorsCheckpoint(tmp_path / "ckpt")
    assert loaded.names == ["b"]
    assert_identical(loaded.tensor("b"), replacement)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old copies left


def test_duplicate_and_unsupported_tensors(tmp_path, rng):
    with pytest.raises(ValueError, match="'a' was added twice"):
        write_checkpoint(tmp_path / "x", [("a", random_float(rng, (2,))), ("a", random_float(rng, (2,)))])
    with pytest.raises(TypeError, match="'c'.*complex128"):
        write_checkpoint(tmp_path / "y", {"c": np.ones(2, np.complex128)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [3, 100])
def test_truncated_file_is_a_clear_error(tmp_path, rng, cut):
    write_checkpoint(tmp_path / "ckpt", {"layer.weight": random_float(rng, (32, 32))})
    path = tmp_path / "ckpt" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        SafetensorsCheckpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "content", [b"", b"\x10\x00", b"garbage bytes that are no header", b"\x08\x00\x00\x00\x00\x00\x00\x00{nojson}"]
)
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        SafetensorsCheckpoint(tmp_path)


def test_index_errors(tmp_path, rng):
    write_checkpoint(tmp_path / "ckpt", {f"t{i}": random_float(rng, (64, 16)) for i in range(2)}, max_shard_bytes=5000)
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "t0": index["weight_map"]["t1"]}}))
    with pytest.raises(ValueError, match=r"omits the shard\(s\) \['model-00001-of-00002.safetensors'\]"):
        SafetensorsCheckpoint(tmp_path / "ckpt")
    both = {**index["weight_map"], "t0": index["weight_map"]["t1"], "t1": index["weight_map"]["t0"]}
    index_path.write_text(json.dumps({"weight_map": both}))
    with pytest.raises(ValueError, match="maps tensor 't[01]'"):
        SafetensorsCheckpoint(tmp_path / "ckpt")
    for outside in ("../model-00001-of-00002.safetensors", "/etc/passwd", "sub/model.safetensors"):
        index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "t0": outside}}))
        with pytest.raises(ValueError, match="not a file name in"):
            SafetensorsCheckpoint(tmp_path / "ckpt")
    index_path.write_text(json.dumps(index))
    os.unlink(tmp_path / "ckpt" / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors is missing"):
        SafetensorsCheckpoint(tmp_path / "ckpt")
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        SafetensorsCheckpoint(tmp_path / "ckpt")
    index_path.write_bytes(b'{"weight_map": "\xff"}')
    with pytest.raises(ValueError, match="index.json: not UTF-8"):
        SafetensorsCheckpoint(tmp_path / "ckpt")


def test_index_listing_a_shard_partly_is_refused(tmp_path, rng):
    write_checkpoint(tmp_path / "three", {f"t{i}": random_float(rng, (16, 16)) for i in range(3)}, max_shard_bytes=2500)
    index_path = tmp_path / "three" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert index["weight_map"]["t0"] == index["weight_map"]["t1"] != index["weight_map"]["t2"]
    del index["weight_map"]["t1"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds tensor 't1', which model.safetensors.index.json does not list"):
        SafetensorsCheckpoint(tmp_path / "three")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        SafetensorsCheckpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither"):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, rng, umask):
    """The checkpoint's directory and files get `0o777` / `0o666` less the umask, as `cp` gives."""
    previous = os.umask(umask)
    try:
        write_checkpoint(tmp_path / "ckpt", {"t": random_float(rng, (4, 4))}, config={"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_second_writer_of_one_destination_fails_while_the_first_works(tmp_path, rng):
    first = CheckpointWriter(tmp_path / "ckpt")
    first.add("t", random_float(rng, (4, 4)))
    with pytest.raises(FileExistsError, match="is being written by another process"):
        CheckpointWriter(tmp_path / "ckpt")
    first.close()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        CheckpointWriter(tmp_path / "ckpt")  # finished first: the second sees it at once
    writer = CheckpointWriter(tmp_path / "ckpt", overwrite=True)
    writer.add("u", random_float(rng, (2, 2)))
    writer.close()
    assert SafetensorsCheckpoint(tmp_path / "ckpt").names == ["u"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no lock or temporary left


def test_writers_killed_before_finishing_are_cleaned_up(tmp_path, rng):
    for leftover in (".ckpt.k3j_x9a0.tmp", ".ckpt.0a1b2c3d.old", ".ckpt.other.abcdefgh.tmp", ".ckptx.abcdefgh.tmp"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "shard-00000.safetensors").write_bytes(b"partial")
    write_checkpoint(tmp_path / "ckpt", {"t": random_float(rng, (4, 4))})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.other.abcdefgh.tmp", ".ckptx.abcdefgh.tmp", "ckpt"]


def test_non_utf8_config_names_its_file(tmp_path, rng):
    write_checkpoint(tmp_path / "ckpt", {"t": random_float(rng, (4, 4))})
    (tmp_path / "ckpt" / "config.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ValueError, match=r"ckpt/config.json: not UTF-8"):
        SafetensorsCheckpoint(tmp_path / "ckpt")
