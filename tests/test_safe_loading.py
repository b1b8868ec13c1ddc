"""Checkpoints are read with weights_only=True: a crafted file is refused with a clear message before any of its
code runs, and a truncated file is named as such (issue 14: loading is safe wherever a file could come from someone
else)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.inference.loading import backbone_weights, load_pipeline
from ldm.models.autoencoder.export import load_autoencoder
from ldm.utils.checkpoint import read_checkpoint


class _Payload:
    """Unpickling this would create `marker`: what a malicious checkpoint does with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "ldm": {"stage": "diffusion"}, "x": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("reader", [read_checkpoint, load_pipeline, backbone_weights, load_autoencoder])
def test_a_crafted_checkpoint_is_refused_before_its_code_runs(reader, crafted: tuple[Path, Path]) -> None:
    path, marker = crafted
    with pytest.raises(ValueError, match="weights_only=True so that a file cannot run code"):
        reader(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the oracle: the same file does run its code when unpickled unsafely
    assert marker.exists()


def test_a_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_checkpoint(path)


def test_plain_checkpoints_load(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "ldm": {"stage": "diffusion", "config": {"a": [1, "b"]}}}, path)
    ckpt = read_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0)) and ckpt["ldm"]["config"] == {"a": [1, "b"]}
