"""docs/quickstart.ipynb: committed clean, and it runs from top to bottom on the packaged model.

The notebook is executed in memory (nothing is written back to docs/) by a Jupyter kernel started
through jupyter_client, with the repository root as its working directory. ipykernel's "python3"
kernelspec says ``python``, which jupyter_client replaces by ``sys.executable`` of this process;
a probe cell appended to the in-memory copy checks that the kernel really is this interpreter
(a user-level "python3" kernelspec pointing elsewhere would win otherwise) and that it imported
this checkout's ``llm_flow``. ~40 s on 2 idle CPU cores (2–3 min when another process
shares them: mean_activations' 30 small forward passes suffer most).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "docs" / "quickstart.ipynb"
PROBE = (
    "import json as _json, sys as _sys, llm_flow as _lf\n"
    "print(_json.dumps({'prefix': _sys.prefix, 'llm_flow': _lf.__file__}))"
)
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_committed_notebook_is_valid_and_has_no_outputs() -> None:
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, (
        f"cells {dirty} of {NOTEBOOK.name} hold outputs or execution counts; clear all "
        "outputs in Jupyter (Edit → Clear Outputs of All Cells) and save before committing"
    )


@pytest.mark.integration
def test_notebook_runs_in_this_interpreter() -> None:
    from nbclient import NotebookClient

    nb = read_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    committed, before = NOTEBOOK.read_bytes(), files_under(REPO / "docs")
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    assert NOTEBOOK.read_bytes() == committed, "executing the notebook rewrote it"
    assert files_under(REPO / "docs") == before, "executing the notebook wrote into docs/"

    (probe_output,) = [o for o in nb.cells[-1].outputs if o.output_type == "stream"]
    kernel = json.loads(probe_output.text)
    assert Path(kernel["prefix"]).resolve() == Path(sys.prefix).resolve(), (
        f"the kernel ran {kernel['prefix']}, not this venv ({sys.prefix}); "
        "a user-level 'python3' kernelspec is shadowing ipykernel's"
    )
    assert Path(kernel["llm_flow"]).resolve().is_relative_to(REPO.resolve()), (
        f"the kernel imported llm_flow from {kernel['llm_flow']}, not from {REPO}"
    )
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if PLOTLY_MIME in o.get("data", {})
    ]
    assert figures, "route.figure() rendered no inline plotly figure"
