"""Our side, run by the JAX venv's python (`$W8A8_JAX_PYTHON`): the command line and jax_side.py."""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open

JAX_SIDE = Path(__file__).with_name("jax_side.py")
ENV_VAR = "W8A8_JAX_PYTHON"


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


def quantize(python: str, source: Path, output: Path, weights: str, activations: str, calibrate: Path | None = None):
    """Our command line: `quantize source output` in one scheme, with the defaults a user gets (the
    compressed-tensors form, the default exclusions)."""
    args = ["-m", "w8a8_jax", "quantize", source, output, "--weights", weights, "--activations", activations]
    args += ["--no-progress"]
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
