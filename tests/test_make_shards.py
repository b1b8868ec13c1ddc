"""scripts/make_shards.py: folder, table and builtin sources, with skip reasons reported."""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"


@pytest.fixture(scope="module")
def make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _keys(out: Path) -> dict[str, bytes]:
    captions = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".txt"):
                    captions[m.name] = tf.extractfile(m).read()
    return captions


def test_folder_source_with_skips(make_shards, tmp_path, capsys):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.webp", "sub/d.png"]):
        Image.new("RGB", (300, 200), (i * 60, 0, 0)).save(src / name)
        (src / name).with_suffix(".txt").write_text(f"caption {name}")
    (src / "sub" / "d.txt").unlink()  # missing caption
    (src / "broken.jpg").write_bytes(b"not a jpeg")  # unreadable image
    (src / "broken.txt").write_text("x")
    (src / "latin.png").write_bytes((src / "a.jpg").read_bytes())
    (src / "latin.txt").write_bytes(b"caf\xe9")  # not UTF-8
    out = tmp_path / "out"
    assert make_shards(["folder", str(src), "--out", str(out), "--shard-size", "2", "--max-side", "64",
                        "--format", "jpg", "--quality", "80"]) == 0
    captions = _keys(out)
    assert sorted(captions.values()) == [b"caption a.jpg", b"caption b.png", b"caption sub/c.webp"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    meta = json.loads((out / "00000_stats.json").read_text())
    assert meta["successes"] == 2
    err = capsys.readouterr().err
    for reason in ("missing_caption", "unreadable_image", "bad_caption"):
        assert reason in err
    with tarfile.open(out / "00000.tar") as tf:
        jpg = next(m for m in tf if m.name.endswith(".jpg"))
        assert max(Image.open(tf.extractfile(jpg)).size) == 64


def test_table_source(make_shards, tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("x.png", "y.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / "img" / name)
    table = tmp_path / "list.tsv"
    table.write_text("file\ttext\nimg/x.png\ta cat\nimg/missing.png\ta dog\nimg/y.png\t\n")
    out = tmp_path / "out"
    assert make_shards(["tsv", str(table), "--path-column", "file", "--caption-column", "text",
                        "--out", str(out), "--format", "png"]) == 0
    assert sorted(_keys(out).values()) == [b"", b"a cat"]  # empty caption kept (used for CFG)
    with pytest.raises(ValueError, match="column 'path' not in"):
        make_shards(["table", str(table), "--out", str(out)])


def test_builtin_source(make_shards, tmp_path):
    out = tmp_path / "shapes"
    assert make_shards(["builtin", "shapes", "--out", str(out), "--num-samples", "12", "--resolution", "16",
                        "--shard-size", "5"]) == 0
    assert len(list((out / "train").glob("*.tar"))) == 3 and (out / "dataset.json").is_file()
    with pytest.raises(SystemExit):
        make_shards(["builtin", "cifar", "--out", str(out), "--num-samples", "4"])
