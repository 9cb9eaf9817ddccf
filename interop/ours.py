"""Our side, run by the JAX venv's python (`$W8A8_JAX_PYTHON`): the command line and jax_side.py."""

import dataclasses
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

JAX_SIDE = Path(__file__).with_name("jax_side.py")
ENV_VAR = "W8A8_JAX_PYTHON"
# The weight block of `--weights block` here: the tiny models' 32..256-wide layers then hold several
# blocks each, all whole (transformers' FineGrainedFP8 dequantization derives the block from the
# scale grid's shape, which is right only when N and K are multiples of the block).
BLOCK_SIZE = "32,32"


def jax_python() -> str:
    """The JAX venv's python, checked to import w8a8_jax; RuntimeError saying what is missing."""
    python = os.environ.get(ENV_VAR)
    if not python:
        raise RuntimeError(f"{ENV_VAR} is not set: point it at the JAX venv's python (scripts/interop.sh does)")
    if not os.access(python, os.X_OK):
        raise RuntimeError(f"{ENV_VAR}={python} is not an executable")
    probe = subprocess.run([python, "-c", "import w8a8_jax, safetensors"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"{ENV_VAR}={python} cannot import w8a8_jax:\n{probe.stderr}")
    return python


def run(python: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `python args...`; AssertionError with its output when it fails."""
    result = subprocess.run([python, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(map(str, args))}` exited {result.returncode}:\n{result.stderr[-4000:]}{result.stdout[-2000:]}"
        )
    return result


def quantize(
    python: str,
    source: Path,
    output: Path,
    weights: str,
    activations: str,
    calibrate: Path | None = None,
    form: str | None = None,
):
    """Our command line: `quantize source output` in one scheme, with the defaults a user gets (the
    compressed-tensors form unless `form` says otherwise, the default exclusions); block weights
    in `BLOCK_SIZE` blocks."""
    args = ["-m", "w8a8_jax", "quantize", source, output, "--weights", weights, "--activations", activations]
    args += ["--no-progress"]
    if weights == "block":
        args += ["--block-size", BLOCK_SIZE]
    if form is not None:
        args += ["--format", form]
    if calibrate is not None:
        args += ["--calibrate", calibrate]
    return run(python, *args)


def inspect(python: str, checkpoint: Path) -> subprocess.CompletedProcess:
    return run(python, "-m", "w8a8_jax", "inspect", checkpoint, "--no-progress")


@dataclasses.dataclass(frozen=True)
class Dump:
    """What `w8a8_jax.checkpoint` reads from a checkpoint (jax_side.py's dump), as torch tensors."""

    config: dict
    layers: list[str]
    tensors: dict[str, torch.Tensor]

    def get(self, prefix: str, leaf: str) -> torch.Tensor | None:
        return self.tensors.get(f"{prefix}.{leaf}")

    def codes(self, prefix: str) -> torch.Tensor:
        """The fp8 codes of a layer, as float8_e4m3fn."""
        return self.tensors[f"{prefix}.weight_fp8"].view(torch.float8_e4m3fn)


def dump(python: str, checkpoint: Path, output: Path) -> Dump:
    """Reads `checkpoint` with w8a8_jax (jax_side.py dump into `output`) and loads the result."""
    run(python, JAX_SIDE, "dump", checkpoint, output)
    with safe_open(str(output), "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return Dump(json.loads(metadata["config"]), json.loads(metadata["layers"]), tensors)


class OurLayers:
    """A checkpoint's fp8 layers run by w8a8_jax (jax_side.py serve) in a worker process.

    >>> with OurLayers(python, checkpoint) as layers:  # doctest: +SKIP
    ...     y = layers("model.layers.0.mlp.down_proj", x)   # x (..., K) -> y (..., N), float32

    Tensors travel as safetensors files in a temporary directory; the worker's stderr goes to a
    file there too, and is quoted when a request fails.
    """

    def __init__(self, python: str, checkpoint: Path):
        self._directory = tempfile.TemporaryDirectory(prefix="our-layers-")
        self._root = Path(self._directory.name)
        self._stderr = open(self._root / "stderr.txt", "w+")
        self._worker = subprocess.Popen(
            [python, str(JAX_SIDE), "serve", str(checkpoint)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            self._answer("ready")
        except BaseException:
            self.close()
            raise

    def _answer(self, expected: str) -> None:
        while True:  # a library may print to stdout on import: only the protocol's lines count
            line = self._worker.stdout.readline()
            if not line:
                self._stderr.seek(0)
                raise AssertionError(f"jax_side.py serve exited {self._worker.wait()}:\n{self._stderr.read()[-4000:]}")
            if line.strip() == expected:
                return
            if line.startswith("error:"):
                raise AssertionError(f"jax_side.py serve: {line.strip()}")

    def __call__(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        source, target = self._root / "x.safetensors", self._root / "y.safetensors"
        save_file({"x": x.detach().float().contiguous()}, source)
        self._worker.stdin.write(f"{prefix} {source} {target}\n")
        self._worker.stdin.flush()
        self._answer("ok")
        return load_file(target)["y"]

    def close(self) -> None:
        if self._worker.poll() is None:
            self._worker.stdin.close()
            try:
                self._worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()
        self._stderr.close()
        self._directory.cleanup()

    def __enter__(self) -> "OurLayers":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
