"""`python scripts/sweep_report.py DIR`: one table and one figure comparing the jobs of a Hydra sweep: final losses,
evaluation metrics, the x0-space error per log-SNR bin (`val/x0_mse_logsnr_*`, the same bins for every schedule) and
what each trial cost (`perf/*`: MFU, images/s, projected GPU-hours and cost, from the throughput callback)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args

log = logging.getLogger(__name__)

History = dict[str, list[tuple[int, float]]]  # metric -> [(global step, value)] in logging order
# perf/*: the throughput callback's last figures (MFU, images/s, projected GPU-hours and cost to max_steps)
DEFAULT_METRICS = ("train/loss", "val/loss", "eval/*", "val/x0_mse_logsnr_*", "perf/mfu", "perf/images_per_s",
                   "perf/gpu_hours_projected", "perf/cost_projected")
BIN = re.compile(r"^val/x0_mse_logsnr_([+-]?\d+(?:\.\d+)?)$")
STEP_KEYS = ("step", "epoch", "trainer/global_step")  # the x axes, not metrics
SKIP_DIRS = {"wandb", "checkpoints", "csv", "images", "export", ".hydra", "__pycache__"}
EXPECTED = ("a Hydra multirun folder (outputs/<task>/multiruns/<time>/ with job folders 0/, 1/, ...), one run folder, "
            "or a folder holding several of them; each job needs .hydra/overrides.yaml and csv/metrics.csv "
            "(logger=csv) or wandb/offline-run-*/ (the default W&B logger)")


@dataclass
class Job:
    path: Path
    overrides: list[str]
    history: History = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)  # last value of every metric
    sources: list[str] = field(default_factory=list)
    label: str = ""
    group: str = ""  # what the job trains: its experiment and stage; jobs of different groups never share a table

    @property
    def step(self) -> int | None:
        steps = [s for points in self.history.values() for s, _ in points]
        return max(steps) if steps else None

    def add(self, source: str, history: History | None = None, final: dict[str, float] | None = None) -> None:
        """Merge one source's metrics; a metric already read from an earlier source keeps that source's values."""
        history, final = history or {}, final or {}
        new_history = {k: v for k, v in history.items() if k not in self.history and v}
        new_final = {k: v for k, v in final.items() if k not in self.final and k not in new_history}
        self.history |= new_history
        self.final |= {k: v[-1][1] for k, v in new_history.items()} | new_final
        if new_history or new_final:
            self.sources.append(source)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# ------------------------------------------------------------------ finding the jobs


def find_jobs(root: Path) -> list[Path]:
    """Every run folder (one holding `.hydra/overrides.yaml` or `config_resolved.yaml`) at or below `root`."""
    jobs = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if (here / ".hydra" / "overrides.yaml").is_file() or (here / "config_resolved.yaml").is_file():
            jobs.append(here)
            dirnames.clear()  # a job's own folders hold no other jobs
        else:
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    return sorted(jobs, key=_natural)


def _natural(path: Path) -> list[Any]:
    """Job folders 2/ before 10/."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


STAGES = {"AutoencoderModule": "stage 1", "DiffusionModule": "stage 2"}


def read_group(job: Path, overrides: Sequence[str]) -> str:
    """`ldm_tiny (stage 2)`: the job's experiment (or task name) and, when its resolved config says, its stage."""
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    config: dict[str, Any] = {}
    if (job / "config_resolved.yaml").is_file():
        config = yaml.safe_load((job / "config_resolved.yaml").read_text()) or {}
    name = experiment or config.get("task_name") or ""
    target = str((config.get("model") or {}).get("_target_", ""))
    stage = STAGES.get(target.rsplit(".", 1)[-1], "")
    return f"{name} ({stage})" if name and stage else name or stage


def read_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    overrides = yaml.safe_load(path.read_text()) or []
    # print_config and the paths of a run say nothing about its configuration
    return [str(o) for o in overrides if not str(o).startswith(("print_config=", "hydra.", "paths."))]


# ------------------------------------------------------------------ the logs of one job


def read_csv_log(path: Path) -> History:
    """Lightning's CSVLogger file: one row per logging call, empty cells for the metrics it did not log."""
    history: History = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row["step"])) if row.get("step") else i
            for key, cell in row.items():
                if key and key not in STEP_KEYS and cell not in (None, ""):
                    history.setdefault(key, []).append((step, float(cell)))
    return history


def read_wandb(folder: Path) -> tuple[History, dict[str, float]]:
    """The W&B runs in `<job>/wandb/` (one per launch of a resumed job, in launch order): history from each run's
    `.wandb` file when it can be read, final values from `files/wandb-summary.json`."""
    history: History = {}
    final: dict[str, float] = {}
    for run_dir in sorted(p for p in folder.glob("*run-*") if p.is_dir() and not p.is_symlink()):
        for wandb_file in sorted(run_dir.glob("run-*.wandb")):
            try:
                rows = wandb_history(wandb_file)
            except (ImportError, ValueError, struct.error) as err:
                log.warning(f"{wandb_file}: history not read ({err}); using wandb-summary.json")
                continue
            for row in rows:
                step = int(_number(row.get("trainer/global_step", row.get("_step"))) or 0)
                for key, value in row.items():
                    if not key.startswith("_") and key not in STEP_KEYS and (value := _number(value)) is not None:
                        history.setdefault(key, []).append((step, value))
        summary_file = run_dir / "files" / "wandb-summary.json"
        try:
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        except json.JSONDecodeError as err:
            log.warning(f"{summary_file}: not read ({err})")
            summary = {}
        for key, value in summary.items():
            if not key.startswith("_") and key not in STEP_KEYS and (value := _number(value)) is not None:
                final[key] = value
    return history, final


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows of a W&B transaction log (`run-<id>.wandb`), read without a W&B server.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records,
    each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf `Record`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    block, header = 32768, 7
    ident, magic, _ = struct.unpack("<4sHB", data[:header])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log")
    rows, chunks, i = [], b"", header
    while i + header <= len(data):
        if block - i % block < header:  # the rest of a block too short for a header is padding
            i += block - i % block
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + header])
        chunk, i = data[i + header:i + header + length], i + header + length
        if kind == 0 or len(chunk) < length:  # zero padding, or the tail of a run that was killed mid-write
            break
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        try:
            record.ParseFromString(chunks)
        except Exception as err:  # protobuf's DecodeError: a damaged record
            raise ValueError(f"damaged record at byte {i}") from err
        if record.WhichOneof("record_type") == "history":
            # a media item (an image) comes as several nested keys (".count", ".height"): not a metric
            rows.append({item.key or item.nested_key[0]: _item_value(item) for item in record.history.item
                         if len(item.nested_key) <= 1})
    return rows


def _item_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind in ("number", "integer"):
        return getattr(item, kind)
    text = item.json if kind == "json" else item.value_json
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def read_eval_jsonl(path: Path) -> History:
    """`eval.jsonl` of the evaluate callback: one line per evaluation, {"step": ..., "eval/fid": ...}."""
    history: History = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            for key, value in row.items():
                if key != "step" and (value := _number(value)) is not None:
                    history.setdefault(key, []).append((int(row.get("step", 0)), value))
    return history


def read_evaluation(path: Path) -> dict[str, float] | None:
    """The json of `scripts/evaluate.py`: eval/<metric>@g<guidance> per guidance scale (stage 2), eval/<metric>
    (stage 1); None for any other json."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("results"), list) or "stage" not in record:
        return None
    final = {}
    for row in record["results"]:
        suffix = f"@g{row['guidance']:g}" if "guidance" in row else ""
        final |= {f"eval/{k}{suffix}": float(v) for k, v in row.items()
                  if k != "guidance" and _number(v) is not None}
    return final


def read_job(path: Path, evaluations: Sequence[Path] = ()) -> Job:
    """Every metric a job left: csv/metrics.csv, then W&B runs, eval.jsonl and evaluate.py jsons in the folder."""
    job = Job(path, read_overrides(path))
    job.group = read_group(path, job.overrides)
    if (path / "csv" / "metrics.csv").is_file():
        job.add("csv", read_csv_log(path / "csv" / "metrics.csv"))
    if (path / "wandb").is_dir():
        job.add("wandb", *read_wandb(path / "wandb"))
    if (path / "eval.jsonl").is_file():
        job.add("eval.jsonl", read_eval_jsonl(path / "eval.jsonl"))
    for json_file in [*sorted(path.glob("*.json")), *sorted(path.glob("*/*.json")), *evaluations]:
        if (final := read_evaluation(json_file)) is not None:
            job.add(json_file.name, final=final)
    return job


# ------------------------------------------------------------------ the whole sweep


def collect(root: str | Path, evaluations: Sequence[str | Path] = ()) -> tuple[list[Job], list[Path]]:
    """The jobs under `root` that logged metrics, and the folders of those that did not."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: expected {EXPECTED}.")
    paths = find_jobs(root)
    if not paths:
        raise ValueError(f"No run folders under {root}: expected {EXPECTED}.")
    by_job: dict[Path, list[Path]] = {}
    for json_file in map(Path, evaluations):  # an evaluate.py json belongs to the job whose checkpoint it scored
        ckpt = Path(json.loads(json_file.read_text()).get("ckpt", "")).resolve()
        owner = next((p for p in paths if p.resolve() in ckpt.parents or p.resolve() == ckpt), None)
        if owner is None:
            raise ValueError(f"{json_file} evaluated {ckpt}, which is in none of the jobs under {root}.")
        by_job.setdefault(owner, []).append(json_file)
    jobs: list[Job] = []
    skipped: list[Path] = []
    for path in paths:
        try:
            job = read_job(path, by_job.get(path, ()))
        except (OSError, ValueError, KeyError) as err:  # a damaged log skips its job, not the report
            log.warning(f"{path}: logs not read ({type(err).__name__}: {err})")
            job = Job(path, [])
        if job.final:
            jobs.append(job)
        else:
            skipped.append(path)
    if not jobs:
        raise ValueError(f"None of the {len(paths)} run folders under {root} logged metrics "
                         f"({', '.join(str(p) for p in skipped[:5])}{', ...' if len(skipped) > 5 else ''}): "
                         f"expected {EXPECTED}.")
    return jobs, skipped


def label_jobs(jobs: list[Job], root: Path) -> list[str]:
    """Label every job by its overrides that not every job shares; returns the shared ones."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    for job in jobs:
        job.label = " ".join(o for o in job.overrides if o not in common) or "(base)"
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.label] = counts.get(job.label, 0) + 1
    for job in jobs:  # the same configuration in two sweeps: tell them apart by folder
        if counts[job.label] > 1:
            job.label = f"{job.label} [{job.path.relative_to(root) if job.path != root else job.path.name}]"
    return [o for o in jobs[0].overrides if o in common]


def select_columns(jobs: Sequence[Job], patterns: Sequence[str], warn: bool = True) -> list[str]:
    """Metric names matching `patterns` (fnmatch), in pattern order; log-SNR bins in increasing log-SNR."""
    names = sorted({k for j in jobs for k in j.final})
    columns: list[str] = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch(n, pattern) and n not in columns]
        if not matched and warn:
            log.warning(f"--metrics {pattern}: no job logged it (logged: {', '.join(names)})")
        columns += sorted(matched, key=lambda n: (0, logsnr(n), "") if logsnr(n) is not None else (1, 0.0, n))
    return columns


def group_jobs(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """Jobs by what they train (`Job.group`), groups in order of their first job."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return groups


def sort_jobs(jobs: list[Job], key: str | None, descending: bool = False) -> list[Job]:
    """By `key` (None: val/loss when logged, else by label); jobs without it, or with NaN, go last."""
    names = {k for j in jobs for k in j.final}
    if key is None:
        key = "val/loss" if "val/loss" in names else None
    elif key not in names:
        raise ValueError(f"--sort {key}: no job logged it; logged metrics: {', '.join(sorted(names))}")
    if key is None:
        return sorted(jobs, key=lambda j: j.label)
    sign = -1.0 if descending else 1.0

    def order(job: Job) -> tuple[bool, float, str]:
        value = job.final.get(key, math.nan)
        return (not math.isfinite(value), sign * value if math.isfinite(value) else 0.0, job.label)

    return sorted(jobs, key=order)


# ------------------------------------------------------------------ table and figure


def logsnr(name: str) -> float | None:
    """The log-SNR of a `val/x0_mse_logsnr_<bin>` metric; None for any other name."""
    match = BIN.match(name)
    return float(match[1]) if match else None


def header(name: str) -> str:
    return f"x0@{name.rsplit('_', 1)[1]}" if logsnr(name) is not None else name


def format_markdown(jobs: Sequence[Job], columns: Sequence[str]) -> str:
    """An aligned markdown table: config, last step, then `columns` (4 significant digits)."""
    heads = ["config", "step", *map(header, columns)]
    rows = [[j.label.replace("|", "\\|"), str(j.step if j.step is not None else ""),
             *(f"{j.final[c]:.4g}" if c in j.final else "" for c in columns)] for j in jobs]
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(heads), rule, *map(line, rows)])


def format_csv(jobs: Sequence[Job], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["config", "group", "job", "step", *columns])
    for j in jobs:
        writer.writerow([j.label, j.group, str(j.path), j.step if j.step is not None else "",
                         *(repr(j.final[c]) if c in j.final else "" for c in columns)])
    return out.getvalue()


def plot(jobs: Sequence[Job], out: Path) -> Path:
    """x0-MSE against log-SNR (one line per configuration, log y), and train/loss against step when logged."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    curves = [j for j in jobs if len(j.history.get("train/loss", [])) > 1]
    fig = Figure(figsize=(12 if curves else 6.5, 4.8), layout="constrained")
    axes = fig.subplots(1, 2 if curves else 1, squeeze=False)[0]
    colors = colormaps["tab10" if len(jobs) <= 10 else "tab20"]
    for i, job in enumerate(jobs):
        bins = sorted((logsnr(k), v) for k, v in job.final.items() if logsnr(k) is not None)
        if bins:
            axes[0].plot(*zip(*bins), "o-", color=colors(i % colors.N), label=job.label)
        if job in curves:
            axes[1].plot(*zip(*job.history["train/loss"]), color=colors(i % colors.N), lw=1, label=job.label)
            if val := job.history.get("val/loss"):
                axes[1].plot(*zip(*val), "s", color=colors(i % colors.N), ms=5)
    axes[0].set(xlabel="log-SNR", ylabel="x0 MSE (val/x0_mse_logsnr_*)", title="Error at fixed noise levels")
    if axes[0].lines:
        axes[0].set_yscale("log")
    else:
        axes[0].text(0.5, 0.5, "no val/x0_mse_logsnr_* logged", ha="center", va="center",
                     transform=axes[0].transAxes)
    if curves:
        axes[1].set(xlabel="step", ylabel="train/loss (squares: val/loss)", title="Loss")
        if all(v > 0 for j in curves for _, v in j.history["train/loss"]):
            axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes if ax.lines), ([], []))
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# ------------------------------------------------------------------ entry point


def report(root: str | Path, *, metrics: Sequence[str] = DEFAULT_METRICS, sort: str | None = None,
           descending: bool = False, fmt: str = "markdown", out: str | Path | None = None,
           evaluations: Sequence[str | Path] = ()) -> str:
    """Read the sweep under `root`, write `<out>.png/.md/.csv` (default `<root>/sweep_report.*`); returns the table.

    Jobs of different experiments or stages (a quickstart's autoencoder and LDM runs) get a table and a figure
    each (`<out>_<group>.png`): their losses are not comparable.
    """
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"format must be markdown or csv, got {fmt!r}")
    root = Path(root)
    jobs, skipped = collect(root, evaluations)
    names = {k for j in jobs for k in j.final}
    if sort is not None and sort not in names:
        raise ValueError(f"--sort {sort}: no job logged it; logged metrics: {', '.join(sorted(names))}")
    select_columns(jobs, metrics, warn=tuple(metrics) != DEFAULT_METRICS)  # warns about patterns no job matched
    groups = group_jobs(jobs)
    out = Path(out) if out is not None else root / "sweep_report.png"
    lines = [f"Sweep report: {len(jobs)} run{'s' * (len(jobs) != 1)} in {root}"
             + (f", {len(skipped)} skipped" if skipped else "")
             + (f"; {len(groups)} experiments/stages, one table each" if len(groups) > 1 else "")]
    rows: list[Job] = []
    figures: list[tuple[list[Job], Path]] = []
    any_bins = False
    for name, members in groups.items():
        common = label_jobs(members, root)
        members = sort_jobs(members, sort if sort in {k for j in members for k in j.final} else None, descending)
        columns = select_columns(members, metrics, warn=False)
        any_bins |= any(logsnr(c) is not None for c in columns)
        figure = out if len(groups) == 1 else out.with_name(f"{out.stem}_{_slug(name)}{out.suffix}")
        if len(groups) > 1:
            lines += ["", f"## {name or '(unnamed)'}  (figure: {figure.name})"]
        if common:
            lines.append(f"Shared overrides: {' '.join(common)}")
        lines += ["", format_markdown(members, columns)]
        rows += members
        figures.append((members, figure))
    if any_bins:
        lines += ["", "x0@λ: val/x0_mse_logsnr_λ, the x0-space MSE at log-SNR λ at the last validation "
                      "(the same bins for every schedule)."]
    if skipped:
        lines += ["", "Skipped (no metrics): " + ", ".join(str(p) for p in skipped)]
    markdown, table_csv = "\n".join(lines) + "\n", format_csv(rows, select_columns(rows, metrics, warn=False))

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".csv").write_text(table_csv)
    try:
        for members, figure in figures:
            plot(members, figure)
    except ImportError:
        log.warning("matplotlib is not installed: no figure (pip install matplotlib); the table is written")
    for path in skipped:
        log.warning(f"skipped {path}: no csv/metrics.csv, W&B run or eval.jsonl with metrics")
    log.info(f"Wrote {', '.join(str(f) for _, f in figures)}, {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return markdown if fmt == "markdown" else table_csv


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "unnamed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare the jobs of a sweep: a table of final metrics and x0-MSE "
                                                 "per log-SNR bin, and a figure.",
                                     epilog=KEY_VALUE_EPILOG.format(example="dir=DIR sort=val/loss descending=true"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", metavar="DIR", help="a multirun folder, one run folder, or a folder holding several multiruns")
    parser.add_argument("--metrics", type=lambda s: [m for m in s.split(",") if m], default=list(DEFAULT_METRICS),
                        help="columns, comma-separated metric names or fnmatch patterns: val/loss,'eval/fid*' "
                             f"(default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--sort", default=None, help="metric to sort the rows by (default: val/loss when logged)")
    parser.add_argument("--descending", action="store_true", help="largest first (e.g. for eval/clip_score)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="what to print (default: markdown)")
    parser.add_argument("--out", default=None, help="the figure (default: DIR/sweep_report.png); the .md and .csv "
                                                    "tables are written beside it")
    parser.add_argument("--evaluation", action="append", default=[], metavar="JSON",
                        help="a scripts/evaluate.py json written outside the job folders, matched to its job by "
                             "checkpoint (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="[sweep_report] %(message)s")
    try:
        table = report(args.dir, metrics=args.metrics, sort=args.sort, descending=args.descending,
                       fmt=args.format, out=args.out, evaluations=args.evaluation)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"sweep_report: error: {err}\n")
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
