"""Safetensors checkpoints on disk: a lazy reader (one file or an index of shards) and an atomic writer.

The reader opens each file with `safetensors.safe_open` (which rejects truncated and corrupt files)
and hands out one tensor at a time, memory-mapped, so nothing is read twice or all at once. The
writer builds the checkpoint in a temporary directory next to the destination, one shard at a time,
and renames it into place only when every file is complete; a lock file beside the destination
keeps two writers from racing for it, and the files get the modes the umask gives (as `cp` does).
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors dtype names -> NumPy dtypes (ml_dtypes for the ones NumPy lacks).
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The NumPy backend of safetensors 0.8 looks these up as `numpy.float8_*`, which NumPy does not have:
# they are read from the memory map at the header's offsets instead.
_MAPPED_DTYPES = ("F8_E4M3", "F8_E5M2")


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        (length,) = np.frombuffer(file.read(8), "<u8")
        return json.loads(file.read(int(length))), 8 + int(length)


class SafetensorsCheckpoint:
    """A safetensors checkpoint: a `.safetensors` file, or a directory with `model.safetensors` or a
    sharded `model.safetensors.index.json`, plus its `config.json` (optional).

    Tensors are read lazily, one at a time (`tensor(name)`); names, dtypes and shapes come from the
    headers without reading data. Every error names the file or tensor.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.directory = path if path.is_dir() else path.parent
        self.config: dict[str, Any] = {}
        config_path = self.directory / CONFIG_FILE
        if config_path.is_file():
            self.config = _read_json(config_path)
        self._file_of: dict[str, Path] = {}
        if path.is_file():
            files = [path]
        elif (self.directory / INDEX_FILE).is_file():
            index = _read_json(self.directory / INDEX_FILE)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{self.directory / INDEX_FILE}: no 'weight_map'")
            files = _index_files(self.directory, weight_map)
        elif (self.directory / SAFETENSORS_FILE).is_file():
            files = [self.directory / SAFETENSORS_FILE]
        else:
            raise FileNotFoundError(f"{path} holds neither {SAFETENSORS_FILE} nor {INDEX_FILE}")
        self._handles = {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._offsets: dict[str, int] = {}
        self._mmaps: dict[Path, np.memmap] = {}
        for file in files:
            self._open(file)
        if path.is_dir() and (self.directory / INDEX_FILE).is_file():
            for name, file in weight_map.items():
                if self._file_of.get(name) != self.directory / file:
                    raise ValueError(f"{INDEX_FILE} maps tensor {name!r} to {file}, which does not hold it")
            for name, file in self._file_of.items():
                if name not in weight_map:
                    raise ValueError(f"{file.name} holds tensor {name!r}, which {INDEX_FILE} does not list")

    def _open(self, file: Path) -> None:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} is missing")
        try:
            handle = safe_open(file, framework="np")
            header, data_start = _header(file)
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"{file.name}: not a valid safetensors file (truncated or corrupt?): {err}") from None
        self._handles[file] = handle
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
            if name in self._file_of:
                raise ValueError(f"tensor {name!r} is in both {self._file_of[name].name} and {file.name}")
            view = handle.get_slice(name)
            self._file_of[name] = file
            self._info[name] = (view.get_dtype(), tuple(view.get_shape()))
            self._offsets[name] = data_start + header[name]["data_offsets"][0]

    @property
    def names(self) -> list[str]:
        return sorted(self._info)

    @property
    def files(self) -> list[Path]:
        return sorted(self._handles)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype ("F8_E4M3", "F32", "BF16", ...) of a tensor."""
        return self._info[self._require(name)][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[self._require(name)][1]

    def nbytes(self, name: str) -> int:
        dtype_name, shape = self._info[self._require(name)]
        return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype_name].itemsize if dtype_name in DTYPES else 0

    def _require(self, name: str) -> str:
        if name not in self._info:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return name

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as a NumPy array (read-only; fp8 as ml_dtypes, memory-mapped)."""
        dtype_name, shape = self._info[self._require(name)]
        if dtype_name not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype_name}, which this reader does not support")
        file = self._file_of[name]
        if dtype_name in _MAPPED_DTYPES:
            if file not in self._mmaps:
                self._mmaps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            count = int(np.prod(shape, dtype=np.int64))
            start = self._offsets[name]
            return self._mmaps[file][start : start + count].view(DTYPES[dtype_name]).reshape(shape)
        return self._handles[file].get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names:
            yield name, self.tensor(name)


_SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")


def _index_files(directory: Path, weight_map: dict[str, Any]) -> list[Path]:
    """The shard files an index names: each inside `directory`, and every `model-i-of-n` shard
    there among them (a shard the index omits would silently drop its tensors)."""
    files = set()
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"{INDEX_FILE} maps tensor {name!r} to {file!r}, not a file name in {directory}")
        files.add(directory / file)
    omitted = sorted(
        path.name for path in directory.glob("model-*-of-*.safetensors") if _SHARD_NAME.fullmatch(path.name)
    )
    omitted = [name for name in omitted if directory / name not in files]
    if omitted:
        raise ValueError(f"{INDEX_FILE} omits the shard(s) {omitted} in {directory}")
    return sorted(files)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(  # noqa: TRY004 (a malformed file, not a wrong argument)
            f"{path}: expected a JSON object, got {type(content).__name__}"
        )
    return content


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, flushes it to disk, then renames it over `path`
    (mode `0o666` less the umask, as a new file gets)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(descriptor, 0o666 & ~_umask())
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _acquire_lock(directory: Path) -> int:
    """Takes the lock of checkpoint `directory` (`.NAME.lock` beside it) without waiting; returns its
    descriptor. FileExistsError if another writer holds it."""
    path = directory.parent / f".{directory.name}.lock"
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise FileExistsError(f"{directory} is being written by another process (it holds {path.name})") from None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the holder before us removed the file after we opened it: lock anew


def _release_lock(directory: Path, descriptor: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory.parent / f".{directory.name}.lock")
    os.close(descriptor)


def _remove_leftovers(directory: Path) -> None:
    """Removes the temporary directories of writers of `directory` that died before finishing
    (called with the lock held, so no live writer owns one)."""
    leftover = re.compile(rf"\.{re.escape(directory.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    for path in directory.parent.iterdir():
        if leftover.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


class CheckpointWriter:
    """Writes a checkpoint directory atomically: tensors go into shards of at most `max_shard_bytes`.

    >>> with CheckpointWriter(out_dir, config={"quantization_config": ...}) as writer:  # doctest: +SKIP
    ...     writer.add("layer.weight", weight)

    Everything is written into a temporary directory beside `directory`; on a clean exit the shards
    (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`),
    `config.json` and any `extra_files` are complete and the temporary directory is renamed to
    `directory`. On an error it is removed and `directory` is untouched. Memory holds at most one
    shard's tensors. A second writer of the same `directory` fails at once (FileExistsError) while
    one is at work; the temporary directories of writers that were killed are removed.

    Args:
      directory: the checkpoint directory; must not exist, or be empty, unless `overwrite`.
      config: the contents of `config.json` (None writes none).
      max_shard_bytes: the size at which a shard is closed (default 4 GiB).
      extra_files: files copied into the checkpoint (tokenizer, ...), by their names.
      metadata: the safetensors `__metadata__` of every shard (default `{"format": "pt"}`, which
        loaders of PyTorch checkpoints expect).
      overwrite: replace an existing non-empty `directory`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        config: Mapping[str, Any] | None = None,
        max_shard_bytes: int = 4 << 30,
        extra_files: Mapping[str, os.PathLike] | None = None,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ):
        self.directory = Path(directory)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.overwrite = overwrite
        self._check_destination()
        self.config = config
        self.max_shard_bytes = max_shard_bytes
        self.extra_files = dict(extra_files or {})
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.directory)
        try:
            self._check_destination()  # again: another writer may have finished before we locked
            _remove_leftovers(self.directory)
            self._temporary = Path(
                tempfile.mkdtemp(prefix=f".{self.directory.name}.", suffix=".tmp", dir=self.directory.parent)
            )
            os.chmod(self._temporary, 0o777 & ~_umask())
        except BaseException:
            _release_lock(self.directory, self._lock)
            raise

    def _check_destination(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"{self.directory} exists and is not a directory")
        if self.directory.is_dir() and any(self.directory.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{self.directory} exists and is not empty (pass overwrite to replace it)")

    def add(self, name: str, array) -> None:
        """Queues one tensor; a full shard is written to disk before it is added."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # not ascontiguousarray, which makes scalars (1,)
        if array.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors checkpoints do not hold")
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = self._temporary / f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0o600
        with open(path, "rb") as file:
            os.fsync(file.fileno())
        self._shards.append((path, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Finishes the checkpoint and renames it into place."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self._temporary / SAFETENSORS_FILE)
        else:
            weight_map = {}
            for i, (path, names) in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                path.rename(self._temporary / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(self._temporary / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        if self.config is not None:
            atomic_write_text(self._temporary / CONFIG_FILE, json.dumps(self.config, indent=2) + "\n")
        for name, source in self.extra_files.items():
            shutil.copyfile(source, self._temporary / name)
        self._check_destination()
        if self.directory.exists():
            # Swap: the old directory moves aside first, so a failure leaves one complete checkpoint.
            previous = Path(
                tempfile.mkdtemp(prefix=f".{self.directory.name}.", suffix=".old", dir=self.directory.parent)
            )
            previous.rmdir()
            self.directory.rename(previous)
            self._temporary.rename(self.directory)
            shutil.rmtree(previous)
        else:
            self._temporary.rename(self.directory)
        self._unlock()

    def abort(self) -> None:
        shutil.rmtree(self._temporary, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            _release_lock(self.directory, self._lock)
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_checkpoint(directory, tensors: Mapping[str, Any] | Iterator[tuple[str, Any]], **writer_args) -> Path:
    """Writes `tensors` (a mapping or `(name, array)` pairs) as a checkpoint; see `CheckpointWriter`."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with CheckpointWriter(directory, **writer_args) as writer:
        for name, array in items:
            writer.add(name, array)
    return Path(directory)
