"""`model.init_from`: a new stage-2 run starts from another run's backbone weights only (the multi-resolution recipe,
experiment=ldm_512 / dit_512): the EMA weights by default, the raw ones on request, another architecture refused."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.conf import CONF_DIR
from ldm.inference.loading import export_pipeline

pytestmark = pytest.mark.slow  # the session's tiny stage-1 + stage-2 runs


def stage2_model(stage2_runs: dict[str, Path], *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ldm_tiny", f"model.autoencoder.path={stage2_runs['ae']}/export",
                                          *overrides])
    return hydra.utils.instantiate(cfg.model)


def test_a_run_starts_from_another_runs_ema(stage2_runs: dict[str, Path]) -> None:
    ckpt = torch.load(stage2_runs["ckpt"], map_location="cpu", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))["state_dict"]
    raw = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    fresh = stage2_model(stage2_runs).backbone.state_dict()
    started = stage2_model(stage2_runs, f"model.init_from={stage2_runs['ckpt']}").backbone.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in started.items())
    assert any(not torch.equal(v, fresh[k]) for k, v in started.items())
    raw_start = stage2_model(stage2_runs, f"model.init_from={stage2_runs['ckpt']}", "model.init_ema=false")
    assert all(torch.equal(v, raw[k]) for k, v in raw_start.backbone.state_dict().items())


def test_an_export_works_too(stage2_runs: dict[str, Path], tmp_path: Path) -> None:
    export = export_pipeline(stage2_runs["ckpt"], tmp_path / "export")
    a = stage2_model(stage2_runs, f"model.init_from={export}").backbone.state_dict()
    b = stage2_model(stage2_runs, f"model.init_from={stage2_runs['ckpt']}").backbone.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_another_architecture_is_refused(stage2_runs: dict[str, Path], tmp_path: Path) -> None:
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"model.init_from=.*: its backbone weights do not fit this DiT: "
                                                     r"missing .*same backbone config"):
        stage2_model(stage2_runs, "model/backbone=dit_tiny", f"model.init_from={stage2_runs['ckpt']}")
    with pytest.raises(InstantiationException, match="nope.ckpt does not exist"):
        stage2_model(stage2_runs, f"model.init_from={tmp_path / 'nope.ckpt'}")
