"""`python scripts/posthoc_ema.py --ckpt <run>/checkpoints/last.ckpt --sigma-rel 0.08`: rebuild the EMA of length
sigma_rel from a run's post-hoc EMA snapshots (EDM2) and write a pipeline export that sample.py and evaluate.py load;
`--list` shows the snapshots and their storage. Sweeping lengths by FID / CLIP score: evaluate.py posthoc_sigma_rel=."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ldm.inference.loading import export_pipeline
from ldm.posthoc_ema import list_snapshots, reconstruct
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def snapshot_folder(ckpt: str | Path, snapshots: str | Path | None = None) -> Path:
    """`snapshots`, else the run's `posthoc_ema` folder (the run folder holds checkpoints/<ckpt>)."""
    return Path(snapshots) if snapshots else Path(ckpt).resolve().parent.parent / "posthoc_ema"


def describe(folder: Path) -> str:
    """One line per snapshot, then the total storage."""
    snapshots = list_snapshots(folder)
    sizes = [s.path.stat().st_size for s in snapshots]
    lines = [f"{s.step:>9}  sigma_rel {list(s.sigma_rels)}  {size / 2**20:.1f} MiB"
             for s, size in zip(snapshots, sizes)]
    return "\n".join([*lines, f"{len(snapshots)} snapshots in {folder}: {sum(sizes) / 2**20:.1f} MiB"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH sigma_rel=0.08"))
    parser.add_argument("--ckpt", required=True, help="the run's stage-2 .ckpt (its config and text encoder)")
    parser.add_argument("--sigma-rel", type=float, default=None, help="EMA length relative to training time")
    parser.add_argument("--step", type=int, default=None, help="rebuild at this snapshot's step (default: the last)")
    parser.add_argument("--snapshots", default=None, help="snapshot folder (default: <run>/posthoc_ema)")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/pipeline_posthoc_<sigma_rel>")
    parser.add_argument("--list", action="store_true", help="list the snapshots and their storage, then exit")
    parser.add_argument("--config", default=None, help="the run's resolved config, if not beside the checkpoint")
    parser.add_argument("--autoencoder", default=None, help="stage-1 export to use instead of the recorded one")
    return parser


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = parse_args(build_parser(), argv)
    folder = snapshot_folder(args.ckpt, args.snapshots)
    if args.list:
        print(describe(folder))
        return None
    if args.sigma_rel is None:
        raise SystemExit("--sigma-rel is required (or --list)")
    result = reconstruct(folder, args.sigma_rel, args.step)
    label = (f"posthoc_ema (sigma_rel {args.sigma_rel} at step {result.step}, {result.num_snapshots} snapshots, "
             f"profile error {result.profile_error:.1e})")
    out = args.out or Path(args.ckpt).resolve().parent.parent / f"pipeline_posthoc_{args.sigma_rel:g}"
    export_pipeline(args.ckpt, out, config=args.config, autoencoder=args.autoencoder, backbone=result.state_dict,
                    weights=label)
    print(f"{label}\nexported to {out}; sample with: python scripts/sample.py ckpt={out} prompt=\"...\"")
    return out


def cli() -> None:
    """The `ldm-posthoc-ema` console script (a console script exits with what its function returns)."""
    main()
