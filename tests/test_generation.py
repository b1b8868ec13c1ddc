"""Generation from real checkpoints, through the entry points: stage 1 -> latent cache -> stage 2 (a few steps each),
then scripts/sample.py (txt2img, img2img, inpainting, exports, EMA vs raw, bad input) and the sampling callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, ROOT, run_train, tiny_overrides
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.cli.sample import run as sample_run
from ldm.data.latent_cache import cache_latents, read_card
from ldm.inference.loading import export_pipeline, load_pipeline
from ldm.models.autoencoder.export import load_autoencoder

pytestmark = pytest.mark.slow
PROMPT = "a large red circle on a white background"


def stage2_overrides(run_dir: Path, export: Path, latents: Path, steps: int = 6) -> list[str]:
    return ["experiment=ldm_tiny", "data=latents", f"data.root={latents}", f"model.autoencoder.path={export}",
            f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}", "data.batch_size=16",
            f"trainer.max_steps={steps}", "num_threads=1", "~callbacks.sample_images"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def runs(stage2_runs: dict[str, Path]) -> dict[str, Path]:
    return stage2_runs


def sample_cfg(out: Path, **overrides: object) -> object:
    args = [f"{k}={v}" for k, v in {"out_dir": out, "steps": 3, "num_images": 2, "batch_size": 3, "device": "cpu",
                                      **overrides}.items()]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=args)


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------ the latent cache


def test_cache_is_key_aligned_and_records_the_autoencoder(runs: dict[str, Path], shapes_root: Path) -> None:
    card = read_card(runs["latents"] / "train")
    autoencoder = load_autoencoder(runs["ae"] / "export")
    assert card["resolution"] == 32 and card["latent_channels"] == autoencoder.latent_channels
    src = sorted(p.name for p in (shapes_root / "train").glob("*.tar"))
    assert sorted(p.name for p in (runs["latents"] / "train").glob("*.tar")) == src
    import tarfile

    with tarfile.open(shapes_root / "train" / src[0]) as a, tarfile.open(runs["latents"] / "train" / src[0]) as b:
        keys = lambda t: sorted({m.name.split(".")[0] for m in t.getmembers()})  # noqa: E731
        assert keys(a) == keys(b)


def test_cache_resumes_only_missing_shards_and_refuses_another_autoencoder(runs: dict[str, Path],
                                                                          shapes_root: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "train"
    shutil.copytree(runs["latents"] / "train", out)
    (out / "00001.tar").unlink()
    autoencoder = load_autoencoder(runs["ae"] / "export")
    summary = cache_latents(autoencoder, str(shapes_root / "train"), out, resolution=32, progress=False)
    assert [p.name for p in summary.written] == ["00001.tar"] and len(summary.resumed) == 7
    with torch.no_grad():
        next(autoencoder.parameters()).add_(1.0)  # another autoencoder
    with pytest.raises(ValueError, match="was written with autoencoder"):
        cache_latents(autoencoder, str(shapes_root / "train"), out, resolution=32, progress=False)


def test_training_refuses_a_cache_of_another_autoencoder(runs: dict[str, Path], tmp_path: Path,
                                                         shapes_root: Path) -> None:
    other = tmp_path / "other_ae"
    run_train(*tiny_overrides(other, shapes_root, steps=2), "logger=none", "seed=7")
    proc = run_train(*stage2_overrides(tmp_path / "ldm", other / "export", runs["latents"], steps=2), "logger=none",
                     check=False)
    assert proc.returncode != 0 and "was written with autoencoder" in proc.stderr


def test_training_refuses_a_cache_of_another_resolution(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = run_train(*stage2_overrides(tmp_path / "ldm", runs["ae"] / "export", runs["latents"], steps=2),
                     "logger=none", "data.resolution=64", check=False)
    assert proc.returncode != 0 and "written at resolution 32, but data.resolution=64" in proc.stderr


# ------------------------------------------------------------------ the sampling callback


def test_sampling_callback_logs_grids_to_wandb_and_the_run_folder(runs: dict[str, Path]) -> None:
    grids = sorted((runs["ldm"] / "images").glob("samples_*.png"))
    assert [g.name for g in grids] == ["samples_00000004.png", "samples_00000006.png"]  # every 4 steps + the end
    assert Image.open(grids[0]).size == (2 * 34 + 2, 4 * 34 + 2)  # 4 prompts x 2 images of 32 px, padding 2
    media = list(runs["ldm"].glob("wandb/offline-run-*/files/media/images/samples_*.png"))
    assert len(media) == 2


# ------------------------------------------------------------------ scripts/sample.py


def test_sample_cli_writes_pngs_jsons_and_a_grid_and_json_reproduces(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), f"ckpt={runs['ckpt']}",
                           f"prompt={PROMPT}", "num_images=3", "steps=4", f"out_dir={tmp_path / 'a'}", "seed=10"],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "a").glob("0*.png"))
    assert len(pngs) == 3 and (tmp_path / "a" / "grid.png").is_file()
    record = json.loads(pngs[2].with_suffix(".json").read_text())
    assert record["seed"] == 12 and record["prompt"] == PROMPT and record["steps"] == 4
    assert record["weights"].startswith("ema")
    keys = ("prompt", "seed", "negative_prompt", "sampler", "steps", "spacing", "guidance", "guidance_rescale",
            "height", "width", "precision")
    again = sample_cfg(tmp_path / "b", ckpt=record["ckpt"], num_images=1, batch_size=1,
                       **{k: json.dumps(record[k]) if isinstance(record[k], str) else record[k] for k in keys})
    written = sample_run(again)
    assert np.abs(png(written[0]).astype(int) - png(pngs[2]).astype(int)).max() <= 1  # same seed, batch of 1


def test_sample_cli_takes_an_aspect_ratio(runs: dict[str, Path], tmp_path: Path) -> None:
    written = sample_run(sample_cfg(tmp_path, ckpt=runs["ckpt"], prompt=f"'{PROMPT}'", num_images=1, aspect="'9:16'"))
    record = json.loads(written[0].with_suffix(".json").read_text())
    assert png(written[0]).shape[:2] == (40, 24) and (record["height"], record["width"]) == (40, 24)


def test_export_samples_the_same_images_as_the_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    export = export_pipeline(runs["ckpt"], tmp_path / "export")
    a = sample_run(sample_cfg(tmp_path / "from_ckpt", ckpt=runs["ckpt"], prompt=f"'{PROMPT}'"))
    b = sample_run(sample_cfg(tmp_path / "from_export", ckpt=export, prompt=f"'{PROMPT}'"))
    assert [png(p).tobytes() for p in a] == [png(p).tobytes() for p in b]


def test_export_script_writes_a_loadable_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_pipeline.py"), "--ckpt", str(runs["ckpt"]),
                           "--out", str(tmp_path / "export"), "--raw"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"pipeline.yaml", "backbone.safetensors",
                                                               "text_encoder.safetensors", "autoencoder"}
    assert load_pipeline(tmp_path / "export").weights == "raw"


def test_a_checkpoint_alone_samples_like_its_run(runs: dict[str, Path], tmp_path: Path) -> None:
    """The checkpoint carries its resolved model config: copied away from its run folder (no config_resolved.yaml
    beside it) it loads and samples the same image; the autoencoder is found at its recorded path."""
    import shutil

    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(runs["ckpt"], alone)
    assert torch.load(alone, map_location="cpu", weights_only=False)["ldm"]["config"]["model"]["backbone"]
    a, b = load_pipeline(runs["ckpt"]), load_pipeline(alone)
    assert a.weights == b.weights and b.default_size == a.default_size
    assert torch.equal(a.generate([PROMPT], [3], steps=3).images, b.generate([PROMPT], [3], steps=3).images)


def test_ema_and_raw_weights_differ(runs: dict[str, Path]) -> None:
    ema, raw = load_pipeline(runs["ckpt"], ema=True), load_pipeline(runs["ckpt"], ema=False)
    assert ema.weights.startswith("ema") and raw.weights == "raw"
    assert any(not torch.equal(a, b) for a, b in zip(ema.backbone.parameters(), raw.backbone.parameters()))


def test_img2img_and_inpainting_from_files(runs: dict[str, Path], tmp_path: Path, shapes_root: Path) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (250, 250, 250)).save(image)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    varied = sample_run(sample_cfg(tmp_path / "i2i", ckpt=runs["ckpt"], prompt=f"'{PROMPT}'", image=image,
                                   strength=0.5))
    assert json.loads(varied[0].with_suffix(".json").read_text())["strength"] == 0.5
    painted = sample_run(sample_cfg(tmp_path / "inpaint", ckpt=runs["ckpt"], prompt=f"'{PROMPT}'", image=image,
                                    mask=mask, repaint=2))
    record = json.loads(painted[0].with_suffix(".json").read_text())
    assert record["strength"] == 1.0 and record["repaint"] == 2 and record["mask"].endswith("mask.png")


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"ckpt": "/nonexistent/last.ckpt"}, FileNotFoundError, "does not exist"),
    ({"height": 20}, ValueError, "multiples of 8"),
    ({"aspect": "16:9", "height": 32}, ValueError, "aspect= or height=/width=, not both"),
    ({"aspect": "sixteen"}, ValueError, "aspect must be 'W:H'"),
    ({"sampler": "plms"}, ValueError, "unknown sampler"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"prompt": "null"}, ValueError, "No prompt"),
    ({"mask": "MASK"}, ValueError, "mask= needs image="),
    ({"image": "IMAGE", "strength": 1.5}, ValueError, "strength must be in"),
    ({"image": "IMAGE", "mask": "SMALL_MASK"}, ValueError, r"mask must be \(B, 1, 32, 32\)"),
    ({"image": "NOT_AN_IMAGE"}, ValueError, "is not an image PIL can read"),
])
def test_sample_cli_bad_input_is_a_clear_error(runs: dict[str, Path], tmp_path: Path, overrides: dict,
                                              error: type, message: str) -> None:
    files = {"IMAGE": tmp_path / "in.png", "MASK": tmp_path / "mask.png", "SMALL_MASK": tmp_path / "small.png",
             "NOT_AN_IMAGE": tmp_path / "text.png"}
    Image.new("RGB", (32, 32)).save(files["IMAGE"])
    Image.new("L", (32, 32)).save(files["MASK"])
    Image.new("L", (16, 16)).save(files["SMALL_MASK"])
    files["NOT_AN_IMAGE"].write_text("not a png")
    values = {"ckpt": runs["ckpt"], "prompt": f"'{PROMPT}'",
              **{k: files.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}}
    with pytest.raises(error, match=message):
        sample_run(sample_cfg(tmp_path / "out", **values))


def test_a_stage1_checkpoint_is_refused_by_name(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a stage-2"):
        sample_run(sample_cfg(tmp_path, ckpt=runs["ae"] / "checkpoints" / "last.ckpt", prompt=f"'{PROMPT}'"))


def test_a_nan_sample_is_reported_and_not_written(runs: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ldm.cli.sample as cli

    real = cli.load_pipeline

    def broken(*args: object, **kwargs: object):
        pipeline = real(*args, **kwargs)
        forward = pipeline.backbone.forward
        pipeline.backbone.forward = lambda x, *a, **k: forward(x, *a, **k) * float("nan")
        return pipeline

    monkeypatch.setattr(cli, "load_pipeline", broken)
    with pytest.raises(FloatingPointError, match="2 of 2 samples contain NaN"):
        sample_run(sample_cfg(tmp_path, ckpt=runs["ckpt"], prompt=f"'{PROMPT}'"))
    assert not list(tmp_path.glob("0*.png"))



# ------------------------------------------------------------------ notebooks


@pytest.mark.parametrize("name", ["sampling.ipynb", "schedules_and_weightings.ipynb"])
def test_notebooks_run_headless(runs: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LDM_CKPT", str(runs["ckpt"]))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend (headless) emits the figures
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    for cell in notebook.cells:  # from a clean state: the committed outputs (`make notebooks`) must not count
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs) >= 3


# ------------------------------------------------------------------ the quickstart, shortened


def test_quickstart_end_to_end_follows_the_prompt_colour(tmp_path: Path) -> None:
    """`scripts/quickstart.py` with fewer steps, in a fresh root: every stage runs through its entry point, and the
    samples' colour matches the prompt far above chance (1/6), so a broken text path fails CI."""
    env = {**_env(), "LDM_ROOT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--stage1-steps", "500",
                           "--stage2-steps", "600", "--images-per-prompt", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "outputs" / "quickstart" / "samples" / "adherence.json").read_text())
    assert result["n"] == 60 and "prompt adherence" in proc.stdout
    assert result["colour_accuracy"] >= 0.40, result["summary"]  # chance is 16.7%
    assert (tmp_path / "outputs" / "quickstart" / "samples" / "grid.png").is_file()


def test_a_moved_project_samples_with_its_own_autoencoder_and_another_is_refused(
        runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Run folders record absolute paths: a copied project must not load the original's autoencoder unnoticed."""
    import shutil

    import torch
    from omegaconf import OmegaConf

    from ldm.inference.loading import find_run_config, locate_autoencoder
    from ldm.models.autoencoder.export import export_autoencoder, weights_hash

    trained_with = torch.load(runs["ckpt"], map_location="cpu", weights_only=False)["ldm"]["autoencoder_sha256"]
    assert trained_with == weights_hash(load_autoencoder(runs["ae"] / "export"))
    moved = tmp_path / "moved"  # the project copied elsewhere, its config still naming the original's export
    shutil.copytree(runs["ae"] / "export", moved / "autoencoder" / "export")
    shutil.copytree(runs["ldm"], moved / "ldm", ignore=shutil.ignore_patterns("wandb", "images"))
    ckpt = moved / "ldm" / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.load(find_run_config(ckpt))
    assert cfg.model.autoencoder.path == str(runs["ae"] / "export")
    assert locate_autoencoder(cfg.model, find_run_config(ckpt), trained_with) == moved / "autoencoder" / "export"
    assert load_pipeline(ckpt).autoencoder is not None

    # the copy's own autoencoder replaced by another one: the recorded original is the right one after all
    ae = load_autoencoder(runs["ae"] / "export")
    with torch.no_grad():
        next(ae.parameters()).add_(0.01)
    export_autoencoder(ae, moved / "autoencoder" / "export")
    assert locate_autoencoder(cfg.model, find_run_config(ckpt), trained_with) == runs["ae"] / "export"

    # a config that names another autoencoder, and no other place to look: refused, naming both
    cfg.paths.output_dir = str(moved / "ldm")
    cfg.model.autoencoder.path = str(moved / "autoencoder" / "export")
    OmegaConf.save(cfg, find_run_config(ckpt))
    with pytest.raises(ValueError, match=rf"trained with autoencoder {trained_with}, but .* holds autoencoder "
                                         rf"{weights_hash(ae)}"):
        load_pipeline(ckpt)
    # asked for by name (a fine-tuned decoder, say): loaded, with a warning
    load_pipeline(ckpt, autoencoder=moved / "autoencoder" / "export")
    assert f"the model was trained with {trained_with}" in caplog.text
