"""`make notebooks`: execute the notebooks in place from a clean kernel, so the committed copies show their plots.

Outputs are kept (figures as embedded image/png); the noisy parts are dropped so a re-run on the same checkpoint
changes only what the code computed: per-cell timing metadata and the kernel's `language_info`.

    python scripts/execute_notebooks.py                       # every notebooks/*.ipynb
    python scripts/execute_notebooks.py notebooks/sampling.ipynb
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, timeout: int) -> None:
    """Run every cell of `path` in a fresh kernel (cwd: the notebook's folder) and write it back with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    metadata = dict(notebook.metadata)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # A failing cell raises CellExecutionError here, before anything is written.
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    notebook.metadata = nbformat.from_dict(metadata)  # drops language_info (the Python patch version)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    os.environ.pop("MPLBACKEND", None)  # the kernel inherits it; any backend but inline would emit no figures
    for path in args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")):
        start = time.time()
        execute(path.resolve(), args.timeout)
        print(f"{path}: executed in {time.time() - start:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
