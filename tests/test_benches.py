"""Smoke runs of the throughput benches at their smallest settings: they finish, report positive rates, and the
diffusers loop of bench/sample_throughput.py draws the same images as our pipeline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Same weights, ladder, noise and guidance: only float32 rounding separates the two sides. Euler on the cosine
# schedule (sigma_max ~ 2e4) is the least exact: its first step cancels two ~2e4-sized numbers.
@pytest.mark.parametrize(("preset", "sampler", "tolerance"), [("tiny", "dpmpp_2m", 1e-4), ("tiny", "euler", 2e-3),
                                                              ("sd-like", "dpmpp_2m", 1e-4)])
def test_sample_throughput_matches_diffusers(preset: str, sampler: str, tolerance: float,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("sample_throughput")
    (row,) = bench.main(["--preset", preset, "--quick", "--sampler", sampler, "--threads", "1"])
    assert row["ours"] > 0 and row["theirs"] > 0 and row["ratio"] > 0 and row["finite"]
    assert row["max_diff"] < tolerance
    assert f"| {preset} | ours | diffusers | 2 | 4 | {row['resolution']} |" in capsys.readouterr().out


def test_sample_throughput_compares_bf16_weights_with_diffusers_bf16_weights() -> None:
    bench = _load("sample_throughput")
    rows = bench.main(["--preset", "tiny", "--quick", "--dtype", "bf16", "--threads", "1"])
    assert [(r["ours_run"], r["diffusers"]) for r in rows] == [("ours", "diffusers"),
                                                              ("ours bf16 weights", "diffusers bf16 weights")]
    assert rows[0]["max_diff"] < 1e-3  # both under the same autocast
    assert 0 < rows[1]["max_diff"] < 0.1 and rows[1]["finite"]  # both all-bf16, rounding in different places


def test_stage2_step_reports_both_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("stage2_step")
    rows = bench.main(["--preset", "tiny", "--quick", "--batch", "4", "--threads", "1", "--peak-tflops", "1"])
    assert [r["input"] for r in rows] == ["images (encoded on the fly)", "cached latents"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
        assert all(v > 0 for v in r["flops"].values())
    assert rows[1]["ratio"] > 0
    assert "cached latents / on the fly" in capsys.readouterr().out


def test_stage2_step_ablation_adds_each_option() -> None:
    """--ablate adds the options cumulatively; the compile options through the "eager" backend (dynamo's capture and
    the blocks/whole-backbone switch, without inductor's ~80 s of code generation on 2 cores)."""
    bench = _load("stage2_step")
    rows = bench.main(["--preset", "tiny", "--quick", "--ablate", "text_cache,channels_last,compile,compile_full",
                       "--compile-backend", "eager", "--batch", "4", "--threads", "1"])
    assert [r["input"].split(", ")[1].split(" (warm-up")[0] for r in rows] == [
        "plain step", "+ text encoder cache", "+ channels_last", "+ compile blocks",
        "+ compile whole backbone (not blocks)"]
    assert all(r["images_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="unknown option"):
        bench.main(["--preset", "tiny", "--quick", "--ablate", "text_cache,bogus", "--batch", "4", "--threads", "1"])


@pytest.mark.slow
def test_sharding_memory_halves_the_training_state_on_two_ranks() -> None:
    import os
    import re
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(BENCH / "sharding_memory.py"), "--unet", "tiny", "--resolution", "32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = float(re.search(r"fsdp / ddp training state: ([0-9.]+)", proc.stdout).group(1))
    assert 0.45 < ratio < 0.55, proc.stdout  # each rank holds half the weights, gradients and AdamW moments


def test_backbone_step_runs_both_backbones_against_diffusers(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU preset's code path (b2 widths, bf16 autocast, MFU) at 2 blocks on 8x8 latents on the CPU."""
    bench = _load("backbone_step")
    rows = bench.main(["--preset", "b2", "--smoke", "--dtype", "bf16", "--threads", "1", "--peak-tflops", "1"])
    assert [(r["backbone"], r["side"]) for r in rows] == [("dit", "ours"), ("dit", "diffusers"),
                                                          ("mmdit", "ours"), ("mmdit", "diffusers")]
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["saved_mib"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
    for ours, theirs in (rows[:2], rows[2:]):
        assert ours["params"] == theirs["params"] and ours["flops"] == theirs["flops"]  # the same network
        assert ours["ratio"] > 0 and 0.8 < ours["saved_ratio"] < 1.25
    assert "b2 mmdit: step time ours/diffusers" in capsys.readouterr().out
