"""Fixtures of the interoperability suite; it runs in the torch venv, our side through `$W8A8_JAX_PYTHON`.

Every model, checkpoint and dump is built once per session, on first use, under pytest's
temporary directory. A step that failed fails every test that needs it, with the same error.
"""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interop import models, ours, torch_side


def _once(method):
    """Memoizes a method on its arguments, failures included (raised again, not retried)."""

    @functools.wraps(method)
    def wrapper(self, *args):
        key = (method.__name__, *args)
        if key not in self.cache:
            try:
                self.cache[key] = (True, method(self, *args))
            except Exception as error:
                self.cache[key] = (False, error)
        ok, value = self.cache[key]
        if not ok:
            raise value
        return value

    return wrapper


@dataclasses.dataclass(frozen=True)
class FloatModel:
    """A tiny float model, saved, with its behaviour on the eval ids."""

    spec: models.ModelSpec
    directory: Path
    model: torch.nn.Module
    ids: torch.Tensor
    output: torch.Tensor
    layer_inputs: dict[str, torch.Tensor]
    layer_outputs: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class OursRun:
    """Our layers' results (see `Artifacts.ours_run`), float32."""

    output: torch.Tensor
    layer_outputs: dict[str, torch.Tensor]


class Artifacts:
    """The session's models, checkpoints and dumps, built on first use."""

    def __init__(self, root: Path, python: str):
        self.root, self.python, self.cache = root, python, {}

    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @_once
    def float_model(self, name: str) -> FloatModel:
        spec = models.MODELS[name]
        model = models.build(spec)
        directory = self._dir("float", name)
        model.save_pretrained(directory)
        ids = models.token_ids(models.EVAL_SEED)
        inputs, outputs = models.linear_io(model, ids)
        return FloatModel(spec, directory, model, ids, models.output(model, ids), inputs, outputs)

    @_once
    def calibration(self, name: str) -> Path:
        """Inputs of every Linear of the float model on random token ids, float32, by module name."""
        inputs, _ = models.linear_io(self.float_model(name).model, models.token_ids(models.CALIBRATION_SEED))
        path = self._dir("calibration", f"{name}.safetensors")
        save_file({layer: x.float().contiguous() for layer, x in inputs.items()}, path)
        return path

    @_once
    def our_checkpoint(self, name: str, weights: str, activations: str, form: str | None = None) -> Path:
        """The float model quantized by our command line (in `form`, default the compressed-tensors one)."""
        output = self._dir("ours", f"{name}-{weights}-{activations}" + ("" if form is None else f"-{form}"))
        calibrate = self.calibration(name) if activations == "static" else None
        ours.quantize(self.python, self.float_model(name).directory, output, weights, activations, calibrate, form)
        return output

    @_once
    def ours_run(self, checkpoint: Path, name: str) -> "OursRun":
        """What our fp8 layers (w8a8_jax, in a worker) compute: the float model's output on the eval ids
        with every fp8 layer of `checkpoint` computed by ours, and each of them on the float model's
        inputs to it."""
        float_model = self.float_model(name)
        layers = self.dump(checkpoint).layers
        with ours.OurLayers(self.python, checkpoint) as our_layers:
            output = torch_side.output_with_layers(float_model.model, float_model.ids, our_layers, layers)
            layer_outputs = {prefix: our_layers(prefix, float_model.layer_inputs[prefix]) for prefix in layers}
        return OursRun(output, layer_outputs)

    @_once
    def dump(self, checkpoint: Path) -> ours.Dump:
        """What w8a8_jax reads from a checkpoint."""
        return ours.dump(self.python, checkpoint, self._dir("dumps", f"{checkpoint.name}.safetensors"))

    @_once
    def in_transformers(self, name: str, weights: str, activations: str, dtype: torch.dtype | None):
        """Our checkpoint as transformers loads it (in `dtype`, default the checkpoint's)."""
        float_model = self.float_model(name)
        checkpoint = self.our_checkpoint(name, weights, activations)
        return torch_side.snapshot(float_model.spec, checkpoint, float_model.ids, float_model.layer_inputs, dtype)

    @_once
    def llmcompressor(self, name: str, scheme: str) -> Path:
        """The float model quantized by llm-compressor's oneshot, saved compressed."""
        output = self._dir("llmcompressor", f"{name}-{scheme}")
        float_model = self.float_model(name)
        torch_side.llmcompressor_quantize(float_model.spec, float_model.directory, scheme, output)
        return output


@pytest.fixture(scope="session")
def jax_python() -> str:
    """The JAX venv's python; every test needs it, and fails (never skips) without it."""
    try:
        return ours.jax_python()
    except RuntimeError as error:
        problem = str(error)
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, jax_python) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("interop"), jax_python)
