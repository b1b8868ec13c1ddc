"""bench/gpu_suite.py at toy size on the CPU: every item runs through the command it uses on a GPU (so the suite does
not rot between the rare sessions with a GPU), and the results are written after every item."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# What the lent GPU machines' image lacks among this project's dependencies (/work/.library/device/KINDS.md; hydra,
# diffusers, open_clip and webdataset travel in .gpu/site, bench/device_carry.sh). The smoke run's items run without
# them, or a rare GPU session would lose its items to an ImportError.
NOT_ON_THE_GPU_IMAGE = ("wandb", "torch_fidelity", "submitit", "hydra_plugins", "pydantic", "platformdirs")


def site_without(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """A folder that shows this venv's site-packages (by links) except the packages starting with `names`."""
    import site

    visible = tmp_path / "site"
    visible.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if not entry.name.startswith(names) and entry.suffix != ".pth":
            (visible / entry.name).symlink_to(entry)
    return visible


@pytest.mark.slow
def test_every_item_of_the_gpu_suite_runs_at_toy_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = suite
    spec.loader.exec_module(suite)
    # the items' python sees only what the GPU image has (-S: no site-packages but PYTHONPATH's)
    monkeypatch.setenv("PYTHONPATH", f"{site_without(tmp_path, NOT_ON_THE_GPU_IMAGE)}{os.pathsep}{ROOT / 'src'}")
    monkeypatch.setattr(suite, "PYTHON", [sys.executable, "-S"])
    probe = subprocess.run([*suite.PYTHON, "-c", "import wandb"], capture_output=True)
    assert probe.returncode != 0  # those packages are really out of the items' sight
    results = suite.main(["--device", "cpu", "--smoke", "--out", str(tmp_path / "out")])
    assert [r["item"] for r in results] == list(suite.ITEMS)
    failed = {r["item"]: r["tail"] for r in results if r["rc"] != 0}
    assert not failed, failed
    benches = {r["item"]: r for r in results if r["item"] not in suite.NEEDS_DATA}
    assert all(r["tables"] for name, r in benches.items() if name != "autoencoder")  # each printed its table
    assert any("throughput ours/diffusers" in line for line in benches["autoencoder"]["tail"])  # a text table
    e2e = next(r for r in results if r["item"] == "train_e2e")
    assert e2e["figures"]["perf/images_per_s"] > 0 and e2e["figures"]["train.py / bench img/s"] > 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [i["item"] for i in written["items"]] == list(suite.ITEMS)
    assert "## train_e2e" in (tmp_path / "out" / "results.md").read_text()


def test_unknown_items_are_named() -> None:
    spec = importlib.util.spec_from_file_location("gpu_suite_args", ROOT / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    with pytest.raises(SystemExit, match="unknown item"):
        suite.main(["--device", "cpu", "--smoke", "--only", "stage2_b128,bogus"])


def test_items_past_the_budget_are_listed_as_not_run(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_suite_budget", ROOT / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    results = suite.main(["--device", "cpu", "--smoke", "--only", "autoencoder,sampling", "--budget", "5",
                          "--out", str(tmp_path)])
    assert [(r["item"], r["rc"]) for r in results] == [("autoencoder", None), ("sampling", None)]
    assert "not run" in results[0]["tail"][0]
    written = json.loads((tmp_path / "results.json").read_text())
    assert [i["item"] for i in written["items"]] == ["autoencoder", "sampling"]
    assert suite.parse_args(["--device", "cpu", "--smoke"]).budget == 0.0  # no budget on the CPU smoke run
    assert suite.parse_args([]).budget == 540.0

