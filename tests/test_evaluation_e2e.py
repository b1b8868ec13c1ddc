"""Evaluation end to end on tiny trained checkpoints (stage 1 -> latent cache -> stage 2 with the evaluation
callback), then scripts/evaluate.py on both stages: json per guidance scale, W&B, reused reference statistics,
the same numbers on two ranks, and clear errors for bad input. Offline: random features, a tiny random CLIP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir

from ldm.cli.evaluate import checkpoint_stage
from ldm.cli.evaluate import run as evaluate_run
from ldm.evaluation.metrics import FeatureStats

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:FID from .* rank-deficient")]
SMOKE = ["features=random", "clip=tiny", "steps=2", "batch_size=4", "kid_subset_size=4", "kid_subsets=5",
         "device=cpu", "wandb.enabled=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def runs(stage2_runs: dict[str, Path]) -> dict[str, Path]:
    return stage2_runs


def evaluate_cfg(runs: dict[str, Path], out: Path, *overrides: str):
    args = [f"ckpt={runs['ckpt']}", f"shards={runs['val']}", "num_samples=8", f"out={out / 'metrics.json'}", *SMOKE,
            *overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=args)


# ------------------------------------------------------------------ the training callback


def test_callback_logs_eval_metrics_every_n_steps_and_at_the_end(runs: dict[str, Path]) -> None:
    lines = [json.loads(line) for line in (runs["ldm"] / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 6]
    for line in lines:
        assert {"eval/fid", "eval/kid_mean", "eval/kid_std", "eval/clip_score"} <= set(line)
        assert line["eval/fid"] > 0 and 0 <= line["eval/clip_score"] <= 100
    with (runs["ldm"] / "csv" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("eval/fid")]
    # on the loggers' axis: the step-4 evaluation beside the train/* of the batch that reached step 4 (logged at 3),
    # the final one after the last batch's (5)
    assert [int(row["step"]) for row in logged] == [3, 6]


# ------------------------------------------------------------------ scripts/evaluate.py, stage 2


def test_evaluate_cli_writes_a_json_per_guidance_and_logs_to_wandb(runs: dict[str, Path], tmp_path: Path) -> None:
    out, reference = tmp_path / "a", tmp_path / "reference.npz"
    args = [f"ckpt={runs['ckpt']}", f"shards={runs['val']}", "num_samples=8", "guidance=[1.0,4.0]",
            f"reference={reference}", f"hydra.run.dir={out}", *SMOKE[:-1]]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["stage"] == "diffusion" and record["weights"].startswith("ema") and record["resolution"] == 32
    assert [r["guidance"] for r in record["results"]] == [1.0, 4.0]
    for row in record["results"]:
        assert {"fid", "kid_mean", "kid_std", "clip_score"} <= set(row) and row["fid"] > 0
    assert record["results"][0]["fid"] != record["results"][1]["fid"]
    assert reference.is_file() and FeatureStats.load(reference).num_samples == 8
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))

    again = evaluate_run(evaluate_cfg(runs, tmp_path / "b", "guidance=4.0", f"reference={reference}"))
    assert again["reference_reused"] and again["results"][0]["fid"] == pytest.approx(record["results"][1]["fid"],
                                                                                      rel=1e-6)


def test_a_pipeline_export_evaluates_like_its_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    from ldm.inference.loading import export_pipeline

    export = export_pipeline(runs["ckpt"], tmp_path / "export")
    assert checkpoint_stage(export) == "diffusion" and checkpoint_stage(runs["ckpt"]) == "diffusion"
    a = evaluate_run(evaluate_cfg(runs, tmp_path / "a", "metrics=[fid,clip_score]"))
    b = evaluate_run(evaluate_cfg(runs, tmp_path / "b", "metrics=[fid,clip_score]", f"ckpt={export}"))
    assert b["results"][0] == pytest.approx(a["results"][0], rel=1e-6)


def test_two_ranks_give_the_numbers_of_one(runs: dict[str, Path], tmp_path: Path) -> None:
    one = evaluate_run(evaluate_cfg(runs, tmp_path / "one", "num_samples=10", "batch_size=3"))
    args = [f"ckpt={runs['ckpt']}", f"shards={runs['val']}", "num_samples=10", f"hydra.run.dir={tmp_path / 'two'}",
            *SMOKE, "batch_size=3"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    for key in ("fid", "kid_mean", "clip_score"):
        assert two["results"][0][key] == pytest.approx(one["results"][0][key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["num_samples=1"], ValueError, "at least 2"),
    (["kid_subset_size=50"], ValueError, "kid_subset_size=50 must be in"),
    (["num_samples=100"], ValueError, "hold only 64 usable samples"),
    (["metrics=[fid,psnr]"], ValueError, "metrics for a diffusion checkpoint"),
    (["REFERENCE_64"], ValueError, "computed from 64 px images, but the images evaluated here are 32 px"),
    (["REFERENCE_OTHER"], ValueError, "feature extractor 'inception-v3-pool3'"),
    (["ckpt=/nonexistent.ckpt"], FileNotFoundError, "does not exist"),
])
def test_bad_input_is_a_clear_error(runs: dict[str, Path], tmp_path: Path, overrides: list[str], error: type,
                                    message: str) -> None:
    stats = FeatureStats.from_features(torch.randn(8, 64), "random-conv-64-seed0-32px", 64)
    if overrides == ["REFERENCE_64"]:
        overrides = [f"reference={stats.save(tmp_path / 'ref64.npz')}"]
    elif overrides == ["REFERENCE_OTHER"]:
        stats.extractor, stats.resolution = "inception-v3-pool3", 32
        overrides = [f"reference={stats.save(tmp_path / 'other.npz')}"]
    with pytest.raises(error, match=message):
        evaluate_run(evaluate_cfg(runs, tmp_path, *overrides))


# ------------------------------------------------------------------ scripts/evaluate.py, stage 1


@pytest.mark.parametrize("which", ["export", "checkpoints/last.ckpt"])
def test_autoencoder_psnr_ssim_lpips_rfid(runs: dict[str, Path], tmp_path: Path, vgg_file: Path, which: str) -> None:
    record = evaluate_run(evaluate_cfg(runs, tmp_path, f"ckpt={runs['ae'] / which}", f"lpips_weights={vgg_file}",
                                       "num_samples=12"))
    assert record["stage"] == "autoencoder" and record["resolution"] == 32  # the training resolution, recorded
    scores = record["results"][0]
    assert set(scores) == {"psnr", "ssim", "lpips", "rfid"}
    assert 5 < scores["psnr"] < 60 and -1 < scores["ssim"] <= 1 and scores["lpips"] >= 0 and scores["rfid"] >= 0


def test_autoencoder_export_of_an_old_card_without_resolution_is_refused(runs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    export = Path(shutil.copytree(runs["ae"] / "export", tmp_path / "export"))
    card = json.loads((export / "autoencoder.json").read_text())
    assert card.pop("resolution") == 32
    (export / "autoencoder.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="resolution= is required for a stage-1 checkpoint"):
        evaluate_run(evaluate_cfg(runs, tmp_path, f"ckpt={export}"))


# ------------------------------------------------------------------ preset=offline, both stages


def _no_weights_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in _env().items() if k not in ("LDM_INCEPTION_WEIGHTS", "LDM_VGG16_WEIGHTS", "HF_HUB_CACHE")}
    return {**env, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}


def _reject_nan(constant: str) -> None:
    raise ValueError(f"{constant} in the json")


@pytest.mark.parametrize("which", ["ae/export", "ckpt"])
def test_preset_offline_evaluates_either_stage_without_any_weights(runs: dict[str, Path], tmp_path: Path,
                                                                   which: str) -> None:
    ckpt = runs["ae"] / "export" if which == "ae/export" else runs["ckpt"]
    args = [f"ckpt={ckpt}", f"shards={runs['val']}", "preset=offline", "num_samples=8", "steps=2", "batch_size=4",
            "kid_subsets=5", "device=cpu", "wandb.enabled=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, env=_no_weights_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=_reject_nan)  # strict JSON
    scores = record["results"][0]
    if which == "ae/export":  # no resolution= either: the card records it
        assert record["resolution"] == 32 and set(scores) == {"psnr", "ssim", "rfid"}
    else:  # kid_subset_size=null with 8 samples: every subset is the whole set, so no std
        assert set(scores) == {"guidance", "fid", "kid_mean", "kid_std", "clip_score"}
        assert scores["kid_std"] is None and scores["kid_mean"] is not None
        assert "kid_std is reported as NaN (null in the json)" in proc.stdout + proc.stderr
