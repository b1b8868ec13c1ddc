"""`make notebooks`: execute the notebooks in place from a clean kernel, so the committed copies show their plots.

Outputs are kept (figures as embedded image/png); the noisy parts are dropped so a re-run on the same checkpoint
changes only what the code computed: per-cell timing metadata, the kernel's `language_info`, and tqdm's warning that
ipywidgets is missing (it names this machine's site-packages). Consecutive prints are merged into one output.

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
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nbformat.write(notebook, path)


def merge_streams(outputs: list) -> list:
    """One stream output per run of prints to the same stream (nbclient keeps one per message)."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if output.output_type == "stream" and previous is not None and previous.output_type == "stream" \
                and previous.name == output.name:
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    # The kernel inherits the environment: any backend but inline would emit no figures.
    os.environ.pop("MPLBACKEND", None)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                          "ignore:IProgress not found"]))
    for path in args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")):
        start = time.time()
        execute(path.resolve(), args.timeout)
        print(f"{path.name}: executed in {time.time() - start:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
