"""Write WebDataset shards (img2dataset layout) from a folder of images with .txt captions, a CSV/TSV table,
or a built-in toy dataset; the logic lives in `ldm.data.shards` and `ldm.data.builtin`.

    python scripts/make_shards.py folder photos/ --out data/photos --max-side 1024
    python scripts/make_shards.py table captions.tsv --path-column file --caption-column text --out data/x
    python scripts/make_shards.py builtin shapes --out data/shapes --num-samples 10000 --resolution 64
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ldm.data.builtin import BUILTIN_DATASETS, write_builtin
from ldm.data.shards import IMAGE_EXTENSIONS, folder_samples, table_samples, write_shards


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("--out", required=True, type=Path, help="output directory for NNNNN.tar shards")
    writing.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    writing.add_argument("--format", choices=["jpg", "png", "webp"], default="jpg", dest="image_format")
    writing.add_argument("--max-side", type=int, default=None, help="downscale so the longest side fits")
    writing.add_argument("--quality", type=int, default=95, help="jpg/webp quality")

    folder = sub.add_parser("folder", parents=[writing], help="images with sibling .txt captions (recursive)")
    folder.add_argument("root", type=Path)
    table = sub.add_parser("table", aliases=["csv", "tsv"], parents=[writing],
                           help="CSV/TSV with image path and caption columns")
    table.set_defaults(source="table")
    table.add_argument("table", type=Path)
    table.add_argument("--path-column", default="path")
    table.add_argument("--caption-column", default="caption")
    table.add_argument("--root", type=Path, default=None, help="base for relative paths (default: table's dir)")

    builtin = sub.add_parser("builtin", help="a procedural/packaged toy dataset")
    builtin.add_argument("name", choices=sorted(BUILTIN_DATASETS))
    builtin.add_argument("--out", required=True, type=Path)
    builtin.add_argument("--num-samples", type=int, required=True, help="train + val samples")
    builtin.add_argument("--resolution", type=int, default=64)
    builtin.add_argument("--seed", type=int, default=0)
    builtin.add_argument("--shard-size", type=int, default=1000)
    builtin.add_argument("--val-fraction", type=float, default=0.1)
    builtin.add_argument("--format", choices=["jpg", "png", "webp"], default="png", dest="image_format")
    return parser


def _count_items(args: argparse.Namespace) -> int | None:
    if args.source == "folder" and args.root.is_dir():
        return sum(1 for p in args.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if args.source == "table" and args.table.is_file():
        with open(args.table, encoding="utf-8", errors="replace") as f:
            return max(0, sum(1 for _ in f) - 1)
    return None


def _print_summary(console: Console, written: int, num_shards: int, skipped: Counter, out: Path) -> None:
    table = Table(title=f"{out}: {written} samples in {num_shards} shard(s)")
    table.add_column("skipped because")
    table.add_column("samples", justify="right")
    for reason, n in sorted(skipped.items()):
        table.add_row(reason, str(n))
    if not skipped:
        table.add_row("(nothing skipped)", "0")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    if args.source == "builtin":
        with console.status(f"writing builtin dataset {args.name!r}"):
            result = write_builtin(args.name, args.out, num_samples=args.num_samples, resolution=args.resolution,
                                   seed=args.seed, shard_size=args.shard_size, val_fraction=args.val_fraction,
                                   image_format=args.image_format)
        console.print(f"train: {result.train_shards} ({result.num_train} samples)")
        console.print(f"val:   {result.val_shards} ({result.num_val} samples)")
        return 0

    skipped: Counter = Counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("reading", total=_count_items(args))

        def advance(n: int) -> None:
            progress.advance(task, n)

        if args.source == "folder":
            samples = folder_samples(args.root, skipped, progress=advance)
        else:
            samples = table_samples(args.table, skipped, path_column=args.path_column,
                                    caption_column=args.caption_column, root=args.root, progress=advance)
        summary = write_shards(samples, args.out, shard_size=args.shard_size, image_format=args.image_format,
                               max_side=args.max_side, quality=args.quality)
    skipped.update(summary.skipped)
    _print_summary(console, summary.num_samples, len(summary.shards), skipped, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
