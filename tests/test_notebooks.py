"""The committed notebooks carry their outputs (`make notebooks`), so a code host shows the plots: a commit that strips
them, or saves a failed or partial run, fails here. That they still run is tested in `test_generation.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_found() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"sampling.ipynb", "schedules_and_weightings.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_its_outputs(path: Path) -> None:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.outputs]
    hint = f"{path.name}: run `make notebooks` and commit the executed notebook"
    # One top-to-bottom run in a fresh kernel numbers the cells 1..n; a stripped or hand-patched notebook does not.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), hint
    assert not [o for o in outputs if o.output_type == "error"], hint
    assert any("image/png" in o.get("data", {}) for o in outputs), hint
    assert path.stat().st_size < 2_000_000, f"{path.name}: keep the figures small (under 2 MB in all)"
