"""scripts/sweep_report.py: job discovery, final metrics from csv / W&B / eval logs, labels, sort order, the table,
the figure and the errors, on synthetic sweep folders; then once on a real two-schedule sweep through train.py."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_train

from ldm.cli.sweep_report import collect, main, read_wandb, report

BINS = (-8, 0, 8)
COMMON = ["experiment=ldm_tiny", "logger=csv", "print_config=false"]


def write_job(job: Path, overrides: list[str], train_loss: list[float], val_loss: float,
              x0_mse: tuple[float, ...], perf: dict[str, float] | None = None) -> Path:
    """A job folder as a Hydra multirun + CSVLogger leave it: train rows every step, one validation row at the end."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "csv").mkdir()
    bins = [f"val/x0_mse_logsnr_{b:+d}" for b in BINS]
    with open(job / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/loss", "val/loss", *bins, *(perf or {})])
        writer.writeheader()
        for step, loss in enumerate(train_loss):
            writer.writerow({"epoch": 0, "step": step, "train/loss": loss})
        if perf:  # the throughput callback logs on its own rows
            writer.writerow({"epoch": 0, "step": len(train_loss) - 1, **perf})
        writer.writerow({"epoch": 0, "step": len(train_loss) - 1, "val/loss": val_loss, **dict(zip(bins, x0_mse))})
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("{}\n")
    write_job(root / "0", [*COMMON, "diffusion/schedule=linear"], [1.0, 0.8, 0.7], 0.31, (0.9, 0.2, 0.011))
    write_job(root / "1", [*COMMON, "diffusion/schedule=cosine"], [1.0, 0.6, 0.5], 0.12, (0.8, 0.1, 0.004))
    write_job(root / "2", [*COMMON, "diffusion/schedule=sigmoid"], [1.0, 0.9, 0.8], 0.25, (0.7, 0.3, 0.02))
    return root


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_table_holds_the_logged_numbers_sorted_by_val_loss(sweep: Path) -> None:
    markdown = report(sweep)
    head, *rows = table_rows(markdown)
    assert head == ["config", "step", "train/loss", "val/loss", "x0@-8", "x0@+0", "x0@+8"]
    assert [r[0] for r in rows] == ["diffusion/schedule=cosine", "diffusion/schedule=sigmoid",
                                    "diffusion/schedule=linear"]
    assert rows[0] == ["diffusion/schedule=cosine", "2", "0.5", "0.12", "0.8", "0.1", "0.004"]
    assert "Shared overrides: experiment=ldm_tiny logger=csv" in markdown  # print_config is dropped
    assert (sweep / "sweep_report.md").read_text() == markdown
    with open(sweep / "sweep_report.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["config"] for r in written] == [r[0] for r in rows]
    assert float(written[2]["val/x0_mse_logsnr_+8"]) == 0.011 and written[2]["job"] == str(sweep / "0")
    png = (sweep / "sweep_report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_cost_and_mfu_columns_come_from_the_throughput_callback(tmp_path: Path) -> None:
    root = tmp_path / "multiruns" / "t"
    root.mkdir(parents=True)
    for i, (mfu, cost) in enumerate([(0.31, 12.5), (0.22, 17.0)]):
        write_job(root / str(i), [*COMMON, f"data.batch_size={64 * (i + 1)}"], [1.0, 0.5], 0.1, (0.1, 0.1, 0.1),
                  perf={"perf/mfu": mfu, "perf/images_per_s": 100.0 * (i + 1), "perf/gpu_hours_projected": 5.0,
                        "perf/cost_projected": cost})
    head, *rows = table_rows(report(root, sort="perf/cost_projected"))
    assert head[-4:] == ["perf/mfu", "perf/images_per_s", "perf/gpu_hours_projected", "perf/cost_projected"]
    assert [r[-4:] for r in rows] == [["0.31", "100", "5", "12.5"], ["0.22", "200", "5", "17"]]


def test_sort_metric_direction_and_columns(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report" / "cmp.png"
    rows = table_rows(report(sweep, sort="val/x0_mse_logsnr_-8", descending=True, out=out,
                             metrics=["val/x0_mse_logsnr_*", "train/loss"]))
    assert rows[0] == ["config", "step", "x0@-8", "x0@+0", "x0@+8", "train/loss"]
    assert [r[0].split("=")[1] for r in rows[1:]] == ["linear", "cosine", "sigmoid"]
    assert out.is_file() and out.with_suffix(".md").is_file() and out.with_suffix(".csv").is_file()
    with pytest.raises(ValueError, match="--sort val/nope: no job logged it; logged metrics: train/loss"):
        report(sweep, sort="val/nope")


def test_csv_format_is_printed_with_full_precision(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--metrics", "val/loss,val/nothing*", str(sweep), "--format", "csv"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "config,group,job,step,val/loss"
    assert out.splitlines()[1].startswith("diffusion/schedule=cosine,") and out.splitlines()[1].endswith(",0.12")


def test_jobs_without_metrics_are_skipped_and_nan_sorts_last(sweep: Path) -> None:
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a job that crashed before logging anything
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text("- diffusion/schedule=karras\n")
    write_job(sweep / "4", [*COMMON, "diffusion/schedule=scaled_linear"], [1.0, float("nan")], float("nan"),
              (1.0, 1.0, 1.0))
    damaged = write_job(sweep / "5", ["diffusion/schedule=cosine", "seed=2"], [1.0], 0.5, (1.0, 1.0, 1.0))
    (damaged / "csv" / "metrics.csv").write_text("step,train/loss\n0,0.5\n1,not-a-number\n")
    jobs, skipped = collect(sweep)
    assert skipped == [sweep / "3", damaged] and len(jobs) == 4
    markdown = report(sweep)
    assert table_rows(markdown)[-1][:4] == ["diffusion/schedule=scaled_linear", "1", "nan", "nan"]
    assert f"Skipped (no metrics): {sweep / '3'}, {damaged}" in markdown


def test_a_parent_folder_of_two_sweeps_and_a_single_run(sweep: Path, tmp_path: Path) -> None:
    other = tmp_path / "multiruns" / "2026-01-02_00-00-00"
    write_job(other / "0", [*COMMON, "diffusion/schedule=cosine"], [1.0, 0.4], 0.1, (0.5, 0.1, 0.001))
    rows = table_rows(report(tmp_path / "multiruns"))[1:]
    assert [r[0] for r in rows] == ["diffusion/schedule=cosine [2026-01-02_00-00-00/0]",
                                    "diffusion/schedule=cosine [2026-01-01_00-00-00/1]",
                                    "diffusion/schedule=sigmoid", "diffusion/schedule=linear"]
    single = table_rows(report(sweep / "1"))[1:]  # one run folder: labelled by all of its overrides
    assert single[0][0] == "experiment=ldm_tiny logger=csv diffusion/schedule=cosine"


def test_stages_and_experiments_get_a_table_each(tmp_path: Path) -> None:
    """A quickstart folder: the autoencoder run and the LDM run are not compared with each other."""
    ae = write_job(tmp_path / "autoencoder", ["experiment=autoencoder_tiny"], [0.5, 0.3], 0.2, ())
    (ae / "config_resolved.yaml").write_text(
        "task_name: autoencoder_tiny\nmodel:\n  _target_: ldm.lightning.autoencoder_module.AutoencoderModule\n")
    for i, schedule in enumerate(("linear", "cosine")):
        job = write_job(tmp_path / "ldm" / str(i), [*COMMON, f"diffusion/schedule={schedule}"], [1.0, 0.5 + i], 0.3 + 0.1 * i,
                        (0.9, 0.2, 0.01))
        (job / "config_resolved.yaml").write_text(
            "task_name: ldm_tiny\nmodel:\n  _target_: ldm.lightning.diffusion_module.DiffusionModule\n")
    markdown = report(tmp_path)
    assert "3 runs in" in markdown and "2 experiments/stages, one table each" in markdown
    sections = markdown.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "autoencoder_tiny (stage 1)  (figure: sweep_report_autoencoder_tiny_stage_1.png)",
        "ldm_tiny (stage 2)  (figure: sweep_report_ldm_tiny_stage_2.png)"]
    (ae_head, ae_row), (ldm_head, *ldm_rows) = table_rows(sections[0]), table_rows(sections[1])
    assert ae_head == ["config", "step", "train/loss", "val/loss"] and ae_row[0] == "experiment=autoencoder_tiny"
    assert [r[0] for r in ldm_rows] == ["diffusion/schedule=linear", "diffusion/schedule=cosine"]  # labelled within
    assert ldm_head[-1] == "x0@+8"
    assert (tmp_path / "sweep_report_autoencoder_tiny_stage_1.png").is_file()
    assert (tmp_path / "sweep_report_ldm_tiny_stage_2.png").is_file()
    with open(tmp_path / "sweep_report.csv") as f:
        assert [r["group"] for r in csv.DictReader(f)] == ["autoencoder_tiny (stage 1)", *["ldm_tiny (stage 2)"] * 2]


def test_bad_folders_say_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="No run folders under .*expected a Hydra multirun folder"):
        collect(tmp_path)
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    with pytest.raises(ValueError, match=r"None of the 1 run folders .* logged metrics .*csv/metrics.csv"):
        collect(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "is not a folder: expected a Hydra multirun folder" in capsys.readouterr().err


# ------------------------------------------------------------------ W&B runs, eval.jsonl, evaluate.py


def write_wandb_log(path: Path, rows: list[dict[str, float]], block: int = 32768) -> None:
    """A `.wandb` transaction log in W&B's LevelDB-style format, records split across 32 KiB blocks as W&B does."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    padding = {"_wandb": "x" * 20000}  # large records, so some cross a block boundary
    for row in rows:
        record = pb.Record()
        for key, value in {**row, **padding}.items():
            record.history.item.add(key=key, value_json=json.dumps(value))
        record.history.item.add(nested_key=["val/images", "count"], value_json="4")  # a media item's field
        payload = record.SerializeToString()
        first = True
        while True:
            left = block - len(data) % block
            if left < 7:
                data += b"\0" * left
                continue
            chunk, payload = payload[:left - 7], payload[left - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            data += struct.pack("<IHB", 0, len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    path.write_bytes(bytes(data))


def test_wandb_history_summary_eval_jsonl_and_evaluate_json(tmp_path: Path) -> None:
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- diffusion/schedule=cosine\n")
    run = job / "wandb" / "offline-run-20260101_000000-abc"
    (run / "files").mkdir(parents=True)
    rows = [{"trainer/global_step": s, "_step": s, "train/loss": 1.0 / (s + 1)} for s in range(5)]
    write_wandb_log(run / "run-abc.wandb", [*rows, {"trainer/global_step": 4, "val/loss": 0.3,
                                                      "val/x0_mse_logsnr_+0": 0.05}])
    (run / "files" / "wandb-summary.json").write_text(json.dumps(
        {"train/loss": 0.2, "val/loss": 0.3, "val/images": {"_type": "images"}, "train/lr": 1e-3, "_runtime": 9}))
    (job / "eval.jsonl").write_text('{"step": 2, "eval/fid": 90.0}\n{"step": 4, "eval/fid": 80.5}\n')
    (job / "metrics.json").write_text(json.dumps(
        {"ckpt": "x", "stage": "diffusion", "results": [{"guidance": 1.5, "fid": 70.0, "clip_score": 20.0},
                                                         {"guidance": 5.0, "fid": 60.0, "clip_score": 25.0}]}))
    history, final = read_wandb(job / "wandb")
    assert history["train/loss"] == [(s, 1.0 / (s + 1)) for s in range(5)] and "val/images" not in history
    assert final == {"train/loss": 0.2, "val/loss": 0.3, "train/lr": 1e-3}
    (job_read,), _ = collect(tmp_path)
    assert job_read.final == {"train/loss": 0.2, "val/loss": 0.3, "val/x0_mse_logsnr_+0": 0.05, "train/lr": 1e-3,
                              "eval/fid": 80.5, "eval/fid@g1.5": 70.0, "eval/clip_score@g1.5": 20.0,
                              "eval/fid@g5": 60.0, "eval/clip_score@g5": 25.0}
    assert job_read.step == 4 and job_read.sources == ["wandb", "eval.jsonl", "metrics.json"]
    head, row = table_rows(report(tmp_path))
    assert head == ["config", "step", "train/loss", "val/loss", "eval/clip_score@g1.5", "eval/clip_score@g5",
                    "eval/fid", "eval/fid@g1.5", "eval/fid@g5", "x0@+0"]
    assert row == ["diffusion/schedule=cosine", "4", "0.2", "0.3", "20", "25", "80.5", "70", "60", "0.05"]


def test_an_evaluate_json_elsewhere_is_matched_by_its_checkpoint(sweep: Path, tmp_path: Path) -> None:
    record = {"ckpt": str(sweep / "2" / "checkpoints" / "last.ckpt"), "stage": "diffusion",
              "results": [{"guidance": 5.0, "fid": 42.0}]}
    (tmp_path / "eval.json").write_text(json.dumps(record))
    jobs, _ = collect(sweep, evaluations=[tmp_path / "eval.json"])
    assert {j.path.name: j.final.get("eval/fid@g5") for j in jobs} == {"0": None, "1": None, "2": 42.0}
    (tmp_path / "bad.json").write_text(json.dumps({**record, "ckpt": "/elsewhere/last.ckpt"}))
    with pytest.raises(ValueError, match="which is in none of the jobs"):
        collect(sweep, evaluations=[tmp_path / "bad.json"])


# ------------------------------------------------------------------ a real sweep


@pytest.mark.slow
def test_a_real_noise_schedule_sweep(tmp_path: Path, shapes_root: Path) -> None:
    """`train.py -m ... diffusion/schedule=linear,cosine` (6 steps each) with the default W&B logger and with
    `logger=csv`: each W&B job is a run of its own, named by its schedule and grouped by sweep, and the script
    reports from the W&B runs exactly the numbers the csv logs hold."""
    import torch

    from ldm.models.autoencoder.export import export_autoencoder
    from ldm.models.autoencoder.kl import AutoencoderKL

    autoencoder = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=16,
                                mid_attention=False, norm_groups=4)  # experiment=ldm_tiny takes 16-channel latents
    autoencoder.set_latent_stats(0.5, torch.zeros(16), torch.ones(16))
    export = export_autoencoder(autoencoder, tmp_path / "ae_export")
    tables = {}
    for logger in ("csv", "wandb"):
        sweep = tmp_path / f"sweep_{logger}"
        run_train("-m", "experiment=ldm_tiny", f"model.autoencoder.path={export}", f"data.root={shapes_root}",
                  "data.num_train=256", "data.num_val=64", "data.shard_size=32", "data.batch_size=16",
                  "data.num_workers=0", "trainer.max_steps=6", "trainer.val_check_interval=3",
                  "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "model.lr_scheduler.warmup_steps=2",
                  "num_threads=1", f"logger={logger}", "~callbacks.sample_images", "diffusion/schedule=linear,cosine",
                  f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}")
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_report.py"), str(sweep)],
                              capture_output=True, text=True, check=True, timeout=120)
        print(proc.stdout)
        head, *rows = table_rows(proc.stdout)
        assert sorted(r[0] for r in rows) == ["diffusion/schedule=cosine", "diffusion/schedule=linear"]
        assert head[:5] == ["config", "step", "train/loss", "val/loss", "x0@-8"]
        last_bin = head.index("x0@+8")
        # then the throughput callback's columns (on the CPU: no MFU, and no cost without a price)
        assert head[last_bin + 1:] == ["perf/images_per_s", "perf/gpu_hours_projected"]
        assert all(int(r[1]) >= 5 and all(float(c) > 0 for c in r[2:]) for r in rows)  # every cell filled
        assert [float(r[3]) for r in rows] == sorted(float(r[3]) for r in rows)  # by val/loss
        assert (sweep / "sweep_report.png").is_file() and (sweep / "sweep_report.md").read_text() == proc.stdout
        jobs, _ = collect(sweep)
        assert all(job.sources[0] == logger for job in jobs)
        tables[logger] = {r[0]: r[2:last_bin + 1] for r in rows}  # the timings differ from run to run
    assert tables["wandb"] == tables["csv"]  # the W&B runs hold each job's own numbers
    assert tables["wandb"]["diffusion/schedule=linear"] != tables["wandb"]["diffusion/schedule=cosine"]

    runs = {}
    for job in ("0", "1"):
        pointer = json.loads((tmp_path / "sweep_wandb" / job / "wandb_run.json").read_text())
        (run,) = (tmp_path / "sweep_wandb" / job / "wandb").glob("offline-run-*")
        assert pointer["dir"] == str(run) and run.name.endswith(pointer["id"])
        runs[pointer["name"]] = pointer
    assert sorted(runs) == ["diffusion/schedule=cosine", "diffusion/schedule=linear"]
    assert len({p["id"] for p in runs.values()}) == 2 and {p["group"] for p in runs.values()} == {"ldm_tiny/sweep_wandb"}
