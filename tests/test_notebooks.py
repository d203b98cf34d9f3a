"""The example notebooks: generated from one story, outputs stripped, and run headless on this backend.

Each backend's pytest process executes only its own notebook, with short settings
(KERAS_NANOGPT_NOTEBOOK_QUICK=1), in a Jupyter kernel on this interpreter.
"""

import os
import sys

import nbformat
import pytest
from conftest import BACKEND
from jupyter_client import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "examples", "notebooks")
sys.path.insert(0, NOTEBOOKS)
import make_notebooks  # noqa: E402


@pytest.mark.parametrize("backend", sorted(make_notebooks.FILE_NAMES))
def test_committed_notebook_is_the_generated_one(backend):
    with open(os.path.join(NOTEBOOKS, make_notebooks.FILE_NAMES[backend]), encoding="utf-8") as f:
        committed = f.read()
    assert committed == make_notebooks.render(backend), (
        "the notebook differs from make_notebooks.py's output: run python examples/notebooks/make_notebooks.py")
    notebook = nbformat.reads(committed, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # The kernel inherits os.environ: KERAS_HOME is conftest's private, seeded cache.
    monkeypatch.setenv(make_notebooks.QUICK_VARIABLE, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    path = os.path.join(NOTEBOOKS, make_notebooks.FILE_NAMES[BACKEND])
    notebook = nbformat.read(path, as_version=4)
    kernel = KernelManager(kernel_name="python3")
    interpreter = kernel.format_kernel_cmd()[0]
    assert os.path.samefile(interpreter, sys.executable), (
        f"the python3 Jupyter kernel runs {interpreter}, not this interpreter {sys.executable}")

    # Raises CellExecutionError (with the cell and its traceback) at the first failing cell,
    # including the notebook's own asserts: parameter count, causality, identical greedy text after load.
    NotebookClient(notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert f"on {BACKEND}" in text
    assert "samples after epoch" in text  # the generation callback ran during fit
    plots = [cell for cell in notebook.cells if "plt.show()" in cell.source]
    assert len(plots) == 1
    assert any("image/png" in output.get("data", {}) for output in plots[0].outputs), "no inline loss curve"
    assert (tmp_path / "pride_and_prejudice.keras").stat().st_size > 0
