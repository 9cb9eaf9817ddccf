"""Runs each notebook under notebooks/ top to bottom on a fresh kernel; any cell error fails the test."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra (nbclient, ipykernel)")
pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Per-cell limit; a whole notebook takes 3-15 s on a 2-core CPU, except 04 (SmolLM2-135M in three fp8
# schemes): about 210 s in full, its longest cell about 80 s; the suite runs it quick (one scheme,
# fewer tokens: about 65 s).
CELL_TIMEOUT_S = 300
QUICK = {"04_smollm2": {"W8A8_JAX_NOTEBOOK_QUICK": "1"}}


def run_notebook(path: Path, monkeypatch, **env: str) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is a child process: it must not inherit the suite's 8 fake host devices.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error


@pytest.mark.parametrize("name", ["01_quickstart", "02_flax_fp8dense", "03_performance", "04_smollm2"])
def test_notebook_runs(name, monkeypatch):
    run_notebook(NOTEBOOKS / f"{name}.ipynb", monkeypatch, **QUICK.get(name, {}))


def test_flax_notebook_runs_on_the_example_block(monkeypatch):
    """Notebook 02's fallback when the MiniLM weights are not installed."""
    run_notebook(NOTEBOOKS / "02_flax_fp8dense.ipynb", monkeypatch, W8A8_JAX_NOTEBOOK_MODEL="llama_block")


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {index} has outputs"
