"""scripts/sample.py as a user runs it: a prompt with commas and quotes through the real `main`, and a start-up
that does not import Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

PROMPT = "a small red circle in the top left corner, on a blue background"
NEGATIVE = "it's \"blue\", isn't it = [sic] ☃"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 checkpoint laid out as train.py writes it (random ldm_tiny weights, config_resolved.yaml)."""
    from ldm.inference.loading import build_pipeline
    from ldm.models.autoencoder.export import export_autoencoder
    from ldm.models.autoencoder.kl import AutoencoderKL

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=16,
                       mid_attention=False, norm_groups=4)  # experiment=ldm_tiny takes 16-channel latents
    ae.set_latent_stats(0.5, torch.zeros(16), torch.ones(16))
    export = export_autoencoder(ae, run / "ae_export")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ldm_tiny", f"model.autoencoder.path={export}"])
    model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    pipeline = build_pipeline(model)
    state = {f"{part}.{k}": v for part in ("backbone", "text_encoder") for k, v in getattr(pipeline, part).state_dict().items()}
    (run / "checkpoints").mkdir()
    torch.save({"ldm": {"stage": "diffusion"}, "state_dict": state}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create({"model": model, "data": {"resolution": 32}}), run / "config_resolved.yaml")
    return run / "checkpoints" / "last.ckpt"


def test_main_takes_prompts_with_commas_and_quotes_as_typed(tiny_ckpt: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    from ldm.cli.sample import main

    # What the shell hands over for: prompt="a small ..., on ..." negative_prompt='it'"'"'s "blue", ...'
    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt={tiny_ckpt}", f"prompt={PROMPT}",
                                      f"negative_prompt={NEGATIVE}", "num_images=1", "steps=2", "device=cpu",
                                      f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    main()
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert (record["prompt"], record["negative_prompt"]) == (PROMPT, NEGATIVE)


def test_the_progress_bar_ends_its_line(tiny_ckpt: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                        one_thread) -> None:
    """One bar over every batch, left finished on its own line: "Wrote ..." used to land on the bar's line."""
    from ldm.cli.sample import run

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={tiny_ckpt}", "prompt=a red circle", "num_images=3", "batch_size=2",
                                           "steps=2", "device=cpu", f"out_dir={tmp_path}"])
    run(cfg)
    err = capfd.readouterr().err
    bar = err[err.rindex("sampling 3 images"):]
    assert "4/4" in bar and bar.endswith("\n") and err.count("sampling 3 images") >= 1


def test_bf16_weights_are_recorded_and_a_bad_dtype_is_named_before_loading(tiny_ckpt: Path, tmp_path: Path,
                                                                            one_thread) -> None:
    from ldm.cli.sample import run

    def cfg(dtype: str) -> object:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("sample", overrides=[f"ckpt={tiny_ckpt}", "prompt=a red circle", "num_images=1",
                                                "steps=2", "device=cpu", f"out_dir={tmp_path / dtype}",
                                                f"weights_dtype={dtype}"])

    [png] = run(cfg("bf16"))
    assert json.loads(png.with_suffix(".json").read_text())["weights_dtype"] == "bf16"
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        run(cfg("int8"))
    assert not (tmp_path / "int8").exists()


def test_sample_starts_without_lightning() -> None:
    """Sampling needs no Trainer: importing Lightning added ~3-8 s to every `scripts/sample.py` start."""
    code = ("import sys\n"
            "for name in ('ldm.cli.sample', 'ldm.cli.cache_latents', 'ldm.cli.evaluate'):\n"
            "    __import__(name)\n"
            "    print(name, sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["ldm.cli.sample []", "ldm.cli.cache_latents []", "ldm.cli.evaluate []"]
