"""`trainer=fsdp` (FSDP2) against `trainer=ddp` on two CPU processes (gloo), through torchrun and train.py:

- the same data and seeds give the same weights, EMA and in-training evaluation (to float rounding: the gradient
  reduce-scatter sums in another order than the all-reduce);
- the sharded run writes one plain checkpoint that `scripts/evaluate.py` loads on one process and scores exactly as
  the distributed evaluation callback did;
- a sharded run stopped at max_steps and continued with `ckpt_path=last` ends bit-identical to one run;
- the post-hoc EMA's snapshots are whole (unsharded) state dicts that agree across the two strategies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, run_train, tiny_overrides
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ldm.posthoc_ema import list_snapshots, reconstruct

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:FID from .* rank-deficient")]
STEPS = 8  # 256 samples / (2 ranks x 16) = 8 batches: one epoch
EVAL = {"num_samples": 9, "steps": 2, "batch_size": 4, "kid_subset_size": 4, "kid_subsets": 5}  # 9: uneven ranks


def torchrun(run_dir: Path, parts: dict[str, Path], trainer: str, steps: int, *extra: str) -> None:
    overrides = [
        "experiment=ldm_tiny", "data=latents", f"data.root={parts['latents']}",
        f"model.autoencoder.path={parts['export']}", f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}",
        f"trainer={trainer}", "data.batch_size=16", f"trainer.max_steps={steps}", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "model.lr_scheduler.warmup_steps=2",
        "num_threads=1", "logger=csv", "callbacks=[default,ema,sample_images,evaluate,posthoc_ema]",
        "callbacks.posthoc_ema.snapshot_every=2",
        "+callbacks.sample_log._target_=ldm.callbacks.sample_log.SampleKeyLog",
        "callbacks.sample_images.every_n_steps=4", "callbacks.sample_images.images_per_prompt=1",
        "callbacks.sample_images.sampling.steps=2", f"callbacks.evaluate.shards={parts['shapes']}/val",
        "callbacks.evaluate.every_n_steps=4", "callbacks.evaluate.metrics=[fid,kid,clip_score]",
        *(f"callbacks.evaluate.{'sampling.' * (k == 'steps')}{k}={v}" for k, v in EVAL.items()),
        "~callbacks.evaluate.features", "+callbacks.evaluate.features={_target_:ldm.evaluation.features.RandomFeatures}",
        "callbacks.evaluate.clip_score.model_name=ldm-tiny-text", "callbacks.evaluate.clip_score.pretrained=null",
        *extra]
    run_train(*overrides, nproc=2, timeout=900)


@pytest.fixture(scope="module")
def runs(latent_parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sharded")
    for trainer in ("ddp_cpu", "fsdp_cpu"):
        torchrun(base / trainer, latent_parts, trainer, STEPS)
    return {"base": base, **{t: base / t for t in ("ddp_cpu", "fsdp_cpu")}, "parts": base}


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def ema_of(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))


def eval_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_fsdp_trains_like_ddp(runs: dict[str, Path]) -> None:
    ddp, fsdp = last(runs["ddp_cpu"]), last(runs["fsdp_cpu"])
    assert ddp["global_step"] == fsdp["global_step"] == STEPS
    assert ddp["state_dict"].keys() == fsdp["state_dict"].keys()  # the plain UNet's names, full shapes
    for name, tensor in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    ema_ddp, ema_fsdp = ema_of(ddp), ema_of(fsdp)
    assert ema_ddp["num_updates"] == ema_fsdp["num_updates"] == STEPS
    for name, tensor in ema_ddp["state_dict"].items():
        assert ema_fsdp["state_dict"][name].shape == tensor.shape
        torch.testing.assert_close(ema_fsdp["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    adam_ddp, adam_fsdp = ddp["optimizer_states"][0]["state"], fsdp["optimizer_states"][0]["state"]
    assert adam_ddp.keys() == adam_fsdp.keys() and int(adam_fsdp[0]["step"]) == STEPS
    for i in adam_ddp:
        torch.testing.assert_close(adam_fsdp[i]["exp_avg_sq"], adam_ddp[i]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    # rank 0 alone writes the evaluation and the sample grids; the numbers agree across the two strategies
    lines = {t: eval_lines(runs[t]) for t in ("ddp_cpu", "fsdp_cpu")}
    assert [line["step"] for line in lines["fsdp_cpu"]] == [line["step"] for line in lines["ddp_cpu"]] == [4, 8]
    for a, b in zip(lines["ddp_cpu"], lines["fsdp_cpu"]):
        assert b == pytest.approx(a, rel=1e-4)
    for t in ("ddp_cpu", "fsdp_cpu"):
        assert sorted(p.name for p in (runs[t] / "images").glob("*.png")) == ["samples_00000004.png",
                                                                             "samples_00000008.png"]


def test_a_sharded_checkpoint_evaluates_on_one_process_as_during_training(runs: dict[str, Path],
                                                                          latent_parts: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from ldm.cli.evaluate import run as evaluate_run

    args = [f"ckpt={runs['fsdp_cpu'] / 'checkpoints' / 'last.ckpt'}", f"shards={latent_parts['shapes']}/val",
            f"out={tmp_path / 'metrics.json'}", "features=random", "clip=tiny", "device=cpu", "wandb.enabled=false",
            "metrics=[fid,kid,clip_score]", "guidance=5.0", "sampler=auto", "spacing=auto", "seed=0",
            *(f"{k}={v}" for k, v in EVAL.items())]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=args)
    offline = evaluate_run(cfg)
    assert offline["weights"].startswith("ema")
    during = eval_lines(runs["fsdp_cpu"])[-1]
    for key in ("fid", "kid_mean", "clip_score"):
        assert offline["results"][0][key] == pytest.approx(during[f"eval/{key}"], rel=1e-4, abs=1e-7), key


def test_a_sharded_run_continued_from_last_equals_one_run(runs: dict[str, Path], latent_parts: dict[str, Path],
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "fsdp_cpu"
    # with activation checkpointing of the sharded blocks too: recomputation is exact, so the end must still be
    extra = ["~callbacks.sample_images", "model.backbone.gradient_checkpointing=true"]
    torchrun(run_dir, latent_parts, "fsdp_cpu", STEPS // 2, *extra)
    torchrun(run_dir, latent_parts, "fsdp_cpu", STEPS, *extra, "ckpt_path=last")
    for rank in (0, 1):
        keys = [(run / f"keys_rank{rank}.tsv").read_text().splitlines() for run in (runs["fsdp_cpu"], run_dir)]
        assert keys[1] == keys[0], f"rank {rank} saw other samples after the restart"
    one, continued = last(runs["fsdp_cpu"]), last(run_dir)
    for name, tensor in one["state_dict"].items():
        assert torch.equal(continued["state_dict"][name], tensor), name
    assert ema_of(continued)["num_updates"] == STEPS
    for name, tensor in ema_of(one)["state_dict"].items():
        assert torch.equal(ema_of(continued)["state_dict"][name], tensor), name
    snaps = [list_snapshots(run / "posthoc_ema") for run in (runs["fsdp_cpu"], run_dir)]
    assert [s.step for s in snaps[1]] == [s.step for s in snaps[0]]
    for a, b in zip(*snaps):
        assert all(torch.equal(v, load_file(str(b.path))[k]) for k, v in load_file(str(a.path)).items()), a.path.name


def test_fsdp_for_the_autoencoder_is_refused_with_a_clear_message(shapes_root: Path, tmp_path: Path) -> None:
    proc = run_train(*tiny_overrides(tmp_path / "ae", shapes_root, steps=1), "trainer=fsdp_cpu", "logger=none",
                     nproc=2, check=False, timeout=900)
    assert proc.returncode != 0
    assert "trainer=fsdp shards the stage-2 UNet; an autoencoder fits one GPU" in proc.stderr, proc.stderr[-3000:]


def test_fsdp_trains_a_dit_like_ddp(latent_parts: dict[str, Path], tmp_path: Path) -> None:
    """The transformer backbone under FSDP2: each DiT block a unit (`blocks()`), the same weights as DDP."""
    ckpts = {}
    for trainer in ("ddp_cpu", "fsdp_cpu"):
        run_train("experiment=ldm_tiny", "model/backbone=dit_tiny", "data=latents", f"data.root={latent_parts['latents']}",
                  f"model.autoencoder.path={latent_parts['export']}", f"hydra.run.dir={tmp_path / trainer}",
                  f"paths.log_dir={tmp_path}", f"trainer={trainer}", "data.batch_size=16", "trainer.max_steps=4",
                  "trainer.limit_val_batches=0", "model.lr_scheduler.warmup_steps=2", "num_threads=1", "logger=none",
                  "callbacks=[default,ema]", nproc=2, timeout=900)
        ckpts[trainer] = last(tmp_path / trainer)
    ddp, fsdp = ckpts["ddp_cpu"], ckpts["fsdp_cpu"]
    assert ddp["ldm"]["backbone"]["_target_"] == "ldm.models.dit.DiT" and fsdp["global_step"] == 4
    assert ddp["state_dict"].keys() == fsdp["state_dict"].keys()
    for name, tensor in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for name, tensor in ema_of(ddp)["state_dict"].items():
        torch.testing.assert_close(ema_of(fsdp)["state_dict"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_posthoc_ema_snapshots_are_whole_and_agree(runs: dict[str, Path]) -> None:
    """FSDP2 gathers each average's shards into the snapshot (rank 0 writes it): same names, full shapes and values
    as DDP's to float rounding, and the rebuild runs on either."""
    snaps = {t: list_snapshots(runs[t] / "posthoc_ema") for t in ("ddp_cpu", "fsdp_cpu")}
    assert [s.step for s in snaps["fsdp_cpu"]] == [s.step for s in snaps["ddp_cpu"]] == [2, 4, 6, 8]
    for a, b in zip(snaps["ddp_cpu"], snaps["fsdp_cpu"]):
        ddp, fsdp = load_file(str(a.path)), load_file(str(b.path))
        assert ddp.keys() == fsdp.keys()
        for name, tensor in ddp.items():
            torch.testing.assert_close(fsdp[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    rebuilt = {t: reconstruct(runs[t] / "posthoc_ema", 0.07).state_dict for t in snaps}
    assert rebuilt["ddp_cpu"].keys() == ema_of(last(runs["ddp_cpu"]))["state_dict"].keys()  # the backbone's names
    for name, tensor in rebuilt["ddp_cpu"].items():
        torch.testing.assert_close(rebuilt["fsdp_cpu"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
