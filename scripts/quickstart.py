"""`make quickstart`: the whole framework on a laptop CPU, on built-in data, through the real entry points.

1. stage 1: trains the tiny autoencoder on the built-in `shapes` shards through `train.py` (the shards are written on
   first use); it measures the latent statistics and exports the autoencoder; prints held-out reconstruction PSNR;
2. caches the latents of every image with that autoencoder (`scripts/cache_latents.py`);
3. stage 2: trains the tiny text-conditional LDM on the cached latents through `train.py experiment=ldm_tiny` (or
   `--experiment dit_tiny` / `mmdit_tiny`: a transformer with flow matching; its run goes to `<out>/<experiment>`,
   beside the UNet's `<out>/ldm`, and reuses stage 1 and the cache);
4. samples a grid for prompts naming every colour x shape pair and scores it with the deterministic shapes checker:
   prints colour and shape accuracy, and writes them to `adherence.json`.
Re-running skips finished stages (--force retrains). Outputs go under $LDM_ROOT (default: the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32


def run(name: str, script: str, overrides: list[str], done_marker: Path, force: bool,
        resume: Path | None = None) -> None:
    """Run one of the repository's entry points, unless its `done_marker` file (written here) says it finished."""
    if done_marker.exists() and not force:
        print(f"[quickstart] {name}: already done ({done_marker}); --force redoes it", flush=True)
        return
    if resume is not None and resume.is_file() and not force:  # an interrupted stage continues where it stopped
        overrides = [*overrides, "ckpt_path=last"]
    cmd = [sys.executable, str(ROOT / script), *overrides]
    print(f"[quickstart] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    done_marker.parent.mkdir(parents=True, exist_ok=True)
    done_marker.write_text(f"{time.time() - start:.0f} s\n")
    print(f"[quickstart] {name}: {(time.time() - start) / 60:.1f} min", flush=True)


@torch.no_grad()
def reconstruction_psnr(export_dir: Path, shards: Path, out_png: Path, n: int = 16) -> float:
    """Reconstruct `n` validation images; write input/reconstruction rows; return PSNR in dB."""
    from ldm.data.webdataset import ShardLoader
    from ldm.models.autoencoder.export import load_autoencoder
    from ldm.utils.images import image_grid

    autoencoder = load_autoencoder(export_dir).eval()
    loader = ShardLoader(str(shards), resolution=RESOLUTION, batch_size=n, num_workers=0, mode="epoch",
                         crop="center", flip=False)
    x = next(iter(loader))["image"]
    recon = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
    image_grid(torch.cat([x, recon]), nrow=n).save(out_png)
    return float(10 * torch.log10(1 / ((recon - x) / 2).square().mean()))


@torch.no_grad()
def adherence(ckpt: Path, out_dir: Path, images_per_prompt: int, steps: int, guidance: float) -> dict:
    """Sample the checker's prompt set with fixed seeds, write grid.png, return the scores."""
    from ldm.data.builtin.shapes_check import CHANCE, prompt_set, score
    from ldm.inference.loading import load_pipeline
    from ldm.utils.images import image_grid

    pipeline = load_pipeline(ckpt)
    prompts = [p for p in prompt_set() for _ in range(images_per_prompt)]
    seeds = list(range(len(prompts)))
    images = torch.cat([pipeline.generate(prompts[i:i + 64], seeds[i:i + 64], steps=steps, guidance=guidance).images
                        for i in range(0, len(prompts), 64)])
    out_dir.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=2 * images_per_prompt).save(out_dir / "grid.png")  # a row: one colour-shape pair
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    scores = score(images, prompts)
    result = {"colour_accuracy": scores.accuracy("color"), "shape_accuracy": scores.accuracy("shape"),
              "background_accuracy": scores.accuracy("background"), "all_three": scores.all_correct,
              "n": scores.n, "chance": CHANCE, "summary": str(scores), "steps": steps, "guidance": guidance,
              "weights": pipeline.weights}
    (out_dir / "adherence.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: $LDM_ROOT/outputs/quickstart")
    parser.add_argument("--force", action="store_true", help="redo stages that already finished")
    parser.add_argument("--stage1-steps", type=int, default=None, help="default: experiment autoencoder_tiny's")
    parser.add_argument("--experiment", default="ldm_tiny", help="the stage-2 experiment: ldm_tiny (UNet), dit_tiny, "
                                                                     "mmdit_tiny")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the stage-2 experiment's")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = Path(os.environ.get("LDM_ROOT", ROOT)).resolve()
    out = (args.out or root / "outputs" / "quickstart").resolve()
    data = root / "data" / f"shapes_{RESOLUTION}"
    start = time.time()

    ae_dir, latents = out / "autoencoder", out / "latents"
    ldm_dir = out / ("ldm" if args.experiment == "ldm_tiny" else args.experiment)
    steps1 = [f"trainer.max_steps={args.stage1_steps}"] if args.stage1_steps else []
    run("stage 1 (autoencoder)", "train.py", ["experiment=autoencoder_tiny", f"hydra.run.dir={ae_dir}",
                                             f"paths.root_dir={root}", "print_config=false", *steps1],
        ae_dir / "done", args.force, resume=ae_dir / "checkpoints" / "last.ckpt")
    psnr = reconstruction_psnr(ae_dir / "export", data / "val", out / "reconstructions.png")
    print(f"[quickstart] held-out reconstruction PSNR {psnr:.2f} dB", flush=True)

    run("latent cache", "scripts/cache_latents.py", [f"autoencoder={ae_dir / 'export'}", f"source={data}",
                                                     f"out={latents}", f"resolution={RESOLUTION}",
                                                     f"hydra.run.dir={out / 'cache_log'}"],
        latents / "done", args.force)

    steps2 = [f"trainer.max_steps={args.stage2_steps}"] if args.stage2_steps else []
    run(f"stage 2 ({args.experiment})", "train.py", [f"experiment={args.experiment}", "data=latents", f"data.root={latents}",
                                                  f"model.autoencoder.path={ae_dir / 'export'}",
                                                  f"hydra.run.dir={ldm_dir}", f"paths.root_dir={root}",
                                                  "print_config=false", *steps2],
        ldm_dir / "done", args.force, resume=ldm_dir / "checkpoints" / "last.ckpt")

    samples = out / ("samples" if args.experiment == "ldm_tiny" else f"samples_{args.experiment}")
    result = adherence(ldm_dir / "checkpoints" / "last.ckpt", samples, args.images_per_prompt,
                       args.sample_steps, args.guidance)
    wandb_runs = sorted(str(p) for d in (ae_dir, ldm_dir) for p in (d / "wandb").glob("offline-run-*"))
    print(f"\n[quickstart] done in {(time.time() - start) / 60:.1f} min")
    print(f"  prompt adherence ({result['n']} samples, {args.sample_steps} steps, guidance {args.guidance}): "
          f"colour {100 * result['colour_accuracy']:.1f}% (aim >= 95%, chance 16.7%), "
          f"shape {100 * result['shape_accuracy']:.1f}% (aim >= 85%, chance 20%), "
          f"background {100 * result['background_accuracy']:.1f}%")
    print(f"  samples: {samples / 'grid.png'} (one colour-shape pair per row; prompts.txt, adherence.json)")
    print(f"  reconstructions (top: input, bottom: output): {out / 'reconstructions.png'}  PSNR {psnr:.2f} dB")
    print(f"  checkpoints: {ae_dir / 'checkpoints'}, {ldm_dir / 'checkpoints'}   autoencoder export: "
          f"{ae_dir / 'export'}")
    print(f"  W&B offline runs: {', '.join(wandb_runs) or 'none'}  (upload with `wandb sync <dir>`)")
    print(f"  sample more: python scripts/sample.py ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'} "
          "prompt=\"a large red star on a white background\"")


if __name__ == "__main__":
    main()
