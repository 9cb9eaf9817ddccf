"""The package's layout promises: a light core import, an independent reference."""

import ast
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).parent


def test_import_is_light():
    """`import w8a8_jax` and its core API load neither flax, safetensors nor tqdm."""
    code = (
        "import sys, w8a8_jax; w8a8_jax.Fp8LinearOp; w8a8_jax.scaled_fp8_quant; "
        "print(sorted(m for m in ('flax', 'safetensors', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    code = "import sys, w8a8_jax; w8a8_jax.checkpoint; print('safetensors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True", out  # the wing loads on first use


def test_reference_imports_nothing_from_the_package():
    tree = ast.parse((TESTS / "reference.py").read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert modules and not [name for name in modules if name.split(".")[0] == "w8a8_jax"], modules
