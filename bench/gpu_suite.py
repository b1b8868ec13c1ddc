"""The GPU suite (issue 15): every GPU figure the project reports, from one command that fits one 600 s call on a
lent H100/H200 (`--budget`, 540 s by default), writing its results after every item so that a run cut short still
leaves figures.

Items, in the order they run (each a subprocess with its own time limit, so an out-of-memory error or a hang costs one
item, not the run; those not measured on a GPU yet come first, so that a run cut short loses the others):
  stage2_b128      ldm_256 (kl_f8_c4 + UNet base) training step from cached latents in GPU memory, 256 px, bf16,
                   batch 128: img/s, UNet TFLOP/s, MFU (bench/stage2_step.py); also images encoded on the fly
  train_e2e        `train.py experiment=ldm_256` for ~90 s on generated latent shards (data loading, logging, EMA,
                   checkpoint callbacks included): the throughput callback's img/s, and its ratio to stage2_b128
  fsdp_1gpu        `train.py experiment=ldm_256 trainer=fsdp trainer.devices=1` (NCCL, bf16) for a few steps
  stage2_ablate    stage2 at batch 256 with the speed options added one by one: prompt cache, regional compile,
                   channels_last, then the whole backbone compiled instead of its blocks
  autoencoder      stage-1 kl_f8 training step at 256 px (bench/autoencoder_step.py)
  backbone_b2      DiT-B/2 and MMDiT (~130M) vs diffusers' PixArt/SD3 transformers, batch 128, regional compile
  sampling         text-to-image img/s, 30 dpmpp_2m steps with classifier-free guidance, vs diffusers

    python bench/gpu_suite.py                              # CUDA: results in bench/gpu_runs/<date>_<gpu>/
    python bench/gpu_suite.py --device cpu --smoke         # every item at toy size (tests/test_gpu_suite.py)
    python bench/gpu_suite.py --only stage2_b128,train_e2e --out /tmp/suite

On a lent machine whose image lacks this project's pure-Python dependencies, carry them (bench/device_carry.sh) and
run `PYTHONPATH=$PWD/.gpu/site:$PWD/src python3 bench/gpu_suite.py --out $OUT`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable]  # the interpreter (and its flags) of every item
TABLE_ROW = re.compile(r"^\|.*\|\s*$")

Command = Callable[[argparse.Namespace, Path], list[str]]


def _bench(name: str, *args: str) -> list[str]:
    return [*PYTHON, str(ROOT / "bench" / f"{name}.py"), *args]


def stage2_b128(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _bench("stage2_step", "--device", "cpu", "--preset", "tiny", "--quick", "--batch", "4")
    return _bench("stage2_step", "--device", "cuda", "--dtype", "bf16", "--preset", "ldm_256", "--batch",
                  str(a.batch), "--repeats", "3", "--steps", "6")


def stage2_ablate(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _bench("stage2_step", "--device", "cpu", "--preset", "tiny", "--quick", "--batch", "4", "--ablate",
                      "text_cache,channels_last")
    return _bench("stage2_step", "--device", "cuda", "--dtype", "bf16", "--preset", "ldm_256", "--batch", "256",
                  "--repeats", "2", "--steps", "4", "--ablate", "text_cache,compile,channels_last,compile_full")


def backbone_b2(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _bench("backbone_step", "--device", "cpu", "--preset", "b2", "--smoke")
    return _bench("backbone_step", "--device", "cuda", "--dtype", "bf16", "--preset", "b2", "--batch", "128",
                  "--repeats", "2", "--compile")


def autoencoder(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _bench("autoencoder_step", "--cpu", "--resolution", "32", "--batch-size", "1", "--steps", "1",
                      "--repeats", "1", "--warmup", "0", "--no-memory", "--threads", "1")
    return _bench("autoencoder_step", "--resolution", "256", "--batch-size", "16", "--repeats", "3")


def sampling(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _bench("sample_throughput", "--device", "cpu", "--preset", "tiny", "--quick")
    return _bench("sample_throughput", "--device", "cuda", "--dtype", "bf16", "--preset", "sd-like", "--steps", "30",
                  "--repeats", "3")


def _train(a: argparse.Namespace, work: Path, name: str, *extra: str) -> list[str]:
    data = work / "data"
    common = [f"hydra.run.dir={work / name}", f"paths.log_dir={work}", "logger=csv", "print_config=false",
              f"data.root={data / 'latents'}", f"model.autoencoder.path={data / 'export'}", "data=latents",
              "trainer.log_every_n_steps=10", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]
    if a.smoke:
        return [*PYTHON, str(ROOT / "train.py"), "experiment=ldm_tiny", *common, "data.batch_size=4",
                "trainer.max_steps=12", "trainer.log_every_n_steps=4", "callbacks.throughput.warmup_steps=1",
                "num_threads=1", *extra]
    return [*PYTHON, str(ROOT / "train.py"), "experiment=ldm_256", *common, "data.resolution=256",
            f"data.batch_size={a.batch}", "model.text_encoder.pretrained=null", "trainer.max_steps=2000",
            "++trainer.max_time=00:00:01:30", "data.num_workers=4", *extra]


def train_e2e(a: argparse.Namespace, work: Path) -> list[str]:
    return _train(a, work, "train_e2e")


def fsdp_1gpu(a: argparse.Namespace, work: Path) -> list[str]:
    if a.smoke:
        return _train(a, work, "fsdp_1gpu", "trainer=fsdp_cpu", "trainer.devices=1", "trainer.max_steps=3",
                      "trainer.precision=bf16-mixed")  # as on the GPU: autocast inside the shards
    return _train(a, work, "fsdp_1gpu", "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=30",
                  "++trainer.max_time=null")


# name -> (command, time limit in seconds on CUDA), in the order they run: the figures not yet measured on a GPU
# first (after stage2_b128, the reference of train_e2e's ratio), so that a run cut short by --budget loses the others
ITEMS: dict[str, tuple[Command, int]] = {
    "stage2_b128": (stage2_b128, 90), "train_e2e": (train_e2e, 180), "fsdp_1gpu": (fsdp_1gpu, 120),
    "stage2_ablate": (stage2_ablate, 270), "autoencoder": (autoencoder, 60), "backbone_b2": (backbone_b2, 150),
    "sampling": (sampling, 120),
}
MIN_ITEM_S = 30  # an item given less than this (CUDA start-up, model build) is not started
NEEDS_DATA = {"train_e2e", "fsdp_1gpu"}


def prepare_data(a: argparse.Namespace, work: Path) -> None:
    """Built-in shapes shards at the run's resolution, a random kl_f8_c4 (tiny on --smoke) autoencoder export with
    SD's latent scale, and the latent cache of those shards made with it: the input of the train.py items."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ldm.data.builtin import write_builtin
    from ldm.data.latent_cache import cache_latents
    from ldm.models.autoencoder.export import export_autoencoder

    data, resolution = work / "data", 32 if a.smoke else 256
    if (data / "latents" / "train").is_dir():
        return
    write_builtin("shapes", data / "shapes", num_samples=64 if a.smoke else 2048, num_val=8 if a.smoke else 64,
                  resolution=resolution, shard_size=16 if a.smoke else 256, seed=0)
    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "conf/model/autoencoder" / ("tiny.yaml" if a.smoke else "kl_f8_c4.yaml"))
    ae = instantiate(cfg, **({"latent_channels": 16} if a.smoke else {}))  # smoke: as experiment=autoencoder_tiny
    ae.set_latent_stats(0.18215, torch.zeros(ae.latent_channels), torch.ones(ae.latent_channels))
    export_autoencoder(ae, data / "export", resolution=resolution)
    ae = ae.to("cuda" if a.device == "cuda" else "cpu").eval()
    for split in ("train", "val"):
        cache_latents(ae, str(data / "shapes" / split), data / "latents" / split, resolution=resolution,
                      batch_size=16 if a.smoke else 128, progress=False)


def last_perf(run: Path) -> dict[str, float]:
    """The throughput callback's last perf/* row in a run's CSV log."""
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    perf = [r for r in rows if r.get("perf/images_per_s")]
    return {k: float(v) for k, v in perf[-1].items() if k.startswith("perf/") and v} if perf else {}


def bench_images_per_s(text: str) -> float | None:
    """The cached-latents img/s of a stage2_step table."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[4] == "cached latents":
            return float(cells[5])
    return None


def write_results(out: Path, results: list[dict], header: str) -> None:
    (out / "results.json").write_text(json.dumps({"header": header, "items": results}, indent=1))
    lines = [f"# GPU suite\n\n{header}\n"]
    for r in results:
        lines += [f"## {r['item']} (rc {r['rc']}, {r['wall_s']:.0f} s)\n", "`" + " ".join(r["command"][1:]) + "`\n"]
        lines += [row for row in r["tables"]] or ["```", *r["tail"], "```"]
        lines += [f"\n{k}: {v}" for k, v in r.get("figures", {}).items()] + [""]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def run_item(name: str, a: argparse.Namespace, out: Path, work: Path, limit: float) -> dict:
    argv = ITEMS[name][0](a, work)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    if a.smoke:
        env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    (out / f"{name}.txt").write_text(text)
    result = {"item": name, "command": argv, "rc": rc, "wall_s": time.perf_counter() - start,
              "tables": [line.rstrip() for line in text.splitlines() if TABLE_ROW.match(line)],
              "tail": text.splitlines()[-15:]}
    if name in NEEDS_DATA and rc == 0:
        result["figures"] = last_perf(work / name)
    return result


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: no CUDA device; run with --device cpu --smoke for the CPU smoke run")
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "CPU"
    names = a.only.split(",") if a.only else list(ITEMS)
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        raise SystemExit(f"gpu_suite: unknown item(s) {unknown}; items: {', '.join(ITEMS)}")
    out = Path(a.out or ROOT / "bench" / "gpu_runs" / f"{date.today()}_{re.sub(r'[^A-Za-z0-9]+', '_', gpu)}")
    work = Path(a.work or out / "work")
    out.mkdir(parents=True, exist_ok=True)
    header = f"{gpu}, {'smoke (toy sizes)' if a.smoke else 'bf16'}, python {sys.version.split()[0]}"
    results: list[dict] = []
    suite_start = time.perf_counter()
    if any(n in NEEDS_DATA for n in names):
        start = time.perf_counter()
        prepare_data(a, work)
        print(f"data prepared in {time.perf_counter() - start:.0f} s", flush=True)
    for name in names:
        limit = ITEMS[name][1] * a.time_scale
        if a.budget:
            left = a.budget - (time.perf_counter() - suite_start)
            if left < MIN_ITEM_S:  # named in the results, so the next run can take them with --only
                results.append({"item": name, "command": ITEMS[name][0](a, work), "rc": None, "wall_s": 0.0,
                                "tables": [], "tail": [f"not run: {left:.0f} s of the {a.budget:.0f} s budget left"]})
                write_results(out, results, header)
                print(f"{name}: not run (budget)", flush=True)
                continue
            limit = min(limit, left)
        results.append(run_item(name, a, out, work, limit))
        if name == "train_e2e" and results[-1].get("figures"):
            bench = next((bench_images_per_s("\n".join(r["tables"])) for r in results if r["item"] == "stage2_b128"),
                         None)
            if bench:
                e2e = results[-1]["figures"]["perf/images_per_s"]
                results[-1]["figures"]["train.py / bench img/s"] = e2e / bench
        write_results(out, results, header)
        r = results[-1]
        print(f"{name}: rc {r['rc']}, {r['wall_s']:.0f} s" + "".join(f", {k} {v:.4g}" for k, v in
                                                                     r.get("figures", {}).items()), flush=True)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="toy sizes, for the CPU (tests/test_gpu_suite.py)")
    p.add_argument("--only", default="", help=f"comma-separated items (default all: {','.join(ITEMS)})")
    p.add_argument("--batch", type=int, default=128, help="stage-2 batch of stage2_b128 and the train.py items")
    p.add_argument("--out", default="", help="results folder (default bench/gpu_runs/<date>_<gpu>)")
    p.add_argument("--work", default="", help="generated data and runs (default <out>/work)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies every item's time limit")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole suite (default 540 on CUDA, none on --smoke): each item's limit is cut "
                        "to what is left, and items that would get under a minimum are listed as not run")
    a = p.parse_args(argv)
    if a.smoke and a.device == "cuda":
        a.device = "cuda" if _cuda() else "cpu"
    if a.smoke:
        a.time_scale = max(a.time_scale, 3.0)  # a busy 2-core CPU
    if a.budget is None:
        a.budget = 0.0 if a.smoke else 540.0  # one `run` call on a lent GPU may last 600 s
    return a


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
