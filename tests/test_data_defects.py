"""Shards broken the way real ones break (issue 13): tars img2dataset writes when every download failed (empty), tars
of captions only, 0-byte files, tars cut mid-member by an interrupted download. Each gives a clear error at start-up
when no shard can give a sample (never a hang), or is read to its last whole sample and counted."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from conftest import run_train
from test_data_pipeline import RES, _good, _record, _totals, _write_tar
from webdataset import WebDataset

from ldm.data import webdataset as wds_module
from ldm.data.shards import scan_tar
from ldm.data.webdataset import ShardLoader


def empty_tar(path: Path) -> None:
    with tarfile.open(path, "w"):
        pass


def zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def captions_only(path: Path) -> None:
    _write_tar(path, [{"__key__": f"t{i}", "txt": b"a caption"} for i in range(3)])


BROKEN = {"empty": empty_tar, "0-byte": zero_byte, "captions only": captions_only}


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_shards_without_any_sample_fail_at_start_up(tmp_path: Path, mode: str) -> None:
    for i, make in enumerate(BROKEN.values()):
        make(tmp_path / f"{i:05d}.tar")
    with pytest.raises(ValueError, match=r"none of the 3 shard\(s\) holds a usable sample .*: 2 empty, 1 no image"):
        ShardLoader(tmp_path, batch_size=2, resolution=RES, num_workers=0, mode=mode, batches_per_epoch=4)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_kind_is_diagnosed(tmp_path: Path, kind: str) -> None:
    BROKEN[kind](tmp_path / "x.tar")
    assert scan_tar(tmp_path / "x.tar").problem == {"empty": "empty", "0-byte": "empty",
                                                    "captions only": "no image"}[kind]
    assert scan_tar(tmp_path / "x.tar").samples == 0


@pytest.mark.slow  # a train.py process
def test_train_py_stops_at_start_up_on_empty_shards_in_resampled_mode(tmp_path: Path) -> None:
    """It used to spin forever with no message."""
    for i in range(2):
        empty_tar(tmp_path / f"{i:05d}.tar")
    proc = run_train("experiment=autoencoder_tiny", "data=webdataset", f"data.train_shards={tmp_path}",
                     "data.mode=resampled", "data.batches_per_epoch=4", "data.num_workers=0", "data.resolution=32",
                     f"hydra.run.dir={tmp_path / 'run'}", "logger=none", check=False, timeout=180)
    assert proc.returncode != 0
    assert "none of the 2 shard(s) holds a usable sample" in proc.stderr + proc.stdout, proc.stderr[-3000:]


def test_broken_shards_beside_good_ones_are_counted(tmp_path: Path) -> None:
    """Mixed in with good shards, empty ones are counted as empty_shard, once each per epoch."""
    _write_tar(tmp_path / "00000.tar", _good("a", 4))
    empty_tar(tmp_path / "00001.tar")
    zero_byte(tmp_path / "00002.tar")
    captions_only(tmp_path / "00003.tar")
    batches = list(ShardLoader(tmp_path, batch_size=2, resolution=RES, num_workers=0, drop_last=False))
    totals = _totals(batches)
    assert sorted(k for b in batches for k in b["key"]) == [f"a{i:03d}" for i in range(4)]
    assert totals["empty_shard"] == 2 and totals["missing_image"] == 3 and totals["bad_shard"] == 0


def truncated_at(path: Path, records: list[dict], member: str, keep: str = "half") -> None:
    """A tar of `records` cut inside `member` (half its data) or right after its header (an interrupted download)."""
    _write_tar(path, records)
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    end = info.offset_data + (info.size // 2 if keep == "half" else 0)
    path.write_bytes(path.read_bytes()[:end])


@pytest.mark.parametrize("keep", ["half", "header"])
def test_the_sample_before_a_truncation_is_delivered(tmp_path: Path, keep: str) -> None:
    """Cut in the first member of the third sample: the second, complete, was held by the key grouping and lost
    with the exception; plain webdataset delivers it too (the oracle)."""
    records = _good("k", 3)
    first_member = sorted(f"k002.{ext}" for ext in records[2] if ext != "__key__")[0]
    truncated_at(tmp_path / "00000.tar", records, first_member, keep)
    batches = list(ShardLoader(tmp_path, batch_size=1, resolution=RES, num_workers=0, drop_last=False,
                               shuffle=False))
    keys = [k for b in batches for k in b["key"]]
    reference = [s["__key__"] for s in WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False,
                                                  handler=lambda exn: False)]
    assert keys == reference == ["k000", "k001"]
    assert _totals(batches)["bad_shard"] == 1 and sum(_totals(batches).values()) == 1


def test_a_half_read_sample_is_lost_with_its_shard_not_blamed_on_a_missing_member(tmp_path: Path) -> None:
    records = _good("k", 3)
    truncated_at(tmp_path / "00000.tar", records, "k002.png")  # k002.json was read, its png is cut
    batches = list(ShardLoader(tmp_path, batch_size=1, resolution=RES, num_workers=0, drop_last=False,
                               shuffle=False))
    assert [k for b in batches for k in b["key"]] == ["k000", "k001"]
    assert _totals(batches)["bad_shard"] == 1 and _totals(batches)["bad_caption"] == 0


def test_remote_empty_shards_in_resampled_mode_stop_with_the_causes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote shards cannot be scanned at start-up: the reader gives up after a run of shards without a sample and
    says what it saw (10,000 in a row by default; 20 here)."""
    empty_tar(tmp_path / "e.tar")
    monkeypatch.setattr(wds_module, "_MAX_CONSECUTIVE_SKIPS", 20)
    loader = ShardLoader([f"pipe:cat {tmp_path / 'e.tar'}"], batch_size=2, resolution=RES, num_workers=0,
                         mode="resampled", batches_per_epoch=2)
    with pytest.raises(RuntimeError, match=r"without a usable sample \(20 empty_shard\)"):
        list(loader)


def test_a_missing_directory_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="shard directory .*nope' does not exist"):
        ShardLoader(tmp_path / "nope", batch_size=2, resolution=RES, num_workers=0)


def test_max_pixels_is_a_config_key() -> None:
    from hydra import compose, initialize_config_dir

    from ldm.conf import CONF_DIR
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=autoencoder_tiny", "data=webdataset", "data.train_shards=x",
                                          "data.max_pixels=1000000"])
    assert cfg.data.max_pixels == 1_000_000


def test_records_helper_still_builds_bad_samples(tmp_path: Path) -> None:
    """A caption-only record among good ones is counted as missing_image, not as an empty shard."""
    _write_tar(tmp_path / "00000.tar", _good("a", 2) + [_record("z", caption=b"only")])
    batches = list(ShardLoader(tmp_path, batch_size=1, resolution=RES, num_workers=0, drop_last=False))
    assert _totals(batches)["missing_image"] == 1 and _totals(batches)["empty_shard"] == 0
