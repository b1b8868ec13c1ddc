"""Text-encoder states cached with the latents (issue 15: "latents and text states prefetched"): the cache holds each
caption's (tokens, pooled, mask) as the frozen encoder gives them, stage 2 trains on them exactly as on encoding the
captions (and runs no text encoder), and a cache from another encoder, a trained encoder or a damaged record is
refused or skipped and counted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_diffusion_module import module

from ldm.cli.cache_latents import build_text_encoder
from ldm.data.builtin import write_builtin
from ldm.data.datamodule import LatentDataModule
from ldm.data.latent_cache import cache_latents, check_text_cache, read_card, text_identity
from ldm.data.webdataset import TEXT_EXTENSIONS, ShardLoader
from ldm.lightning.diffusion_module import DiffusionModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiffusionModule]:
    """48 + 16 shapes images at 16 px cached with `module()`'s autoencoder and (tiny, frozen) text encoder."""
    root = tmp_path_factory.mktemp("text_cache")
    write_builtin("shapes", root / "shapes", num_samples=64, num_val=16, resolution=16, shard_size=16, seed=0)
    m = module(cond_drop_prob=0.5)
    for split in ("train", "val"):
        cache_latents(m.autoencoder, str(root / "shapes" / split), root / "latents" / split, resolution=16,
                      batch_size=7, progress=False, text_encoder=m.text_encoder)  # 7: batches unlike training's
    return root / "latents", m


def first_batch(latents: Path, text_states: bool = True, batch_size: int = 8) -> dict:
    dm = LatentDataModule(root=str(latents), resolution=16, batch_size=batch_size, num_workers=0,
                          text_states=text_states)
    dm.setup("fit")
    dm.train_loader.set_epoch(0)
    return next(iter(dm.train_loader))


def test_the_cache_holds_the_encoders_states_and_names_it(cache: tuple[Path, DiffusionModule]) -> None:
    latents, m = cache
    assert read_card(latents / "train")["text_encoder"] == text_identity(m.text_encoder)
    batch = first_batch(latents)
    tokens, pooled, mask = batch["text"]
    with torch.no_grad():
        fresh = m.text_encoder.encode(batch["caption"])
    assert tokens.shape == (8, 77, m.text_encoder.width) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, fresh.tokens, rtol=1e-5, atol=1e-5)  # another batch size rounds differently
    torch.testing.assert_close(pooled, fresh.pooled, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, fresh.mask)
    assert "text" not in first_batch(latents, text_states=False)  # data.text_states=false: encode the captions


def test_training_on_cached_states_equals_encoding_and_runs_no_text_encoder(
        cache: tuple[Path, DiffusionModule], monkeypatch: pytest.MonkeyPatch) -> None:
    latents, m = cache
    batch = first_batch(latents)
    losses = {}
    for name, b in (("encoded", {k: v for k, v in batch.items() if k != "text"}), ("cached", batch)):
        torch.manual_seed(3)  # the same noise, timesteps and caption dropout (p = 0.5) on both
        if name == "cached":
            monkeypatch.setattr(m.text_encoder, "encode", lambda *a: pytest.fail("the text encoder ran"))
        cond, dropped = m.embed_captions(b["caption"], m.cond_drop_prob, b.get("text"))
        losses[name] = m.loss(m.backbone, m.latents(b), cond).loss
    assert 0 < int(dropped.sum()) < len(dropped)  # some captions were dropped to the empty prompt, some kept
    torch.testing.assert_close(losses["cached"], losses["encoded"], rtol=1e-5, atol=1e-6)
    cond, _ = m.embed_captions(batch["caption"], 1.0, batch["text"])  # all dropped: the encoder's empty prompt
    torch.testing.assert_close(cond.tokens, m.text_encoder.null_embedding(1).tokens.expand_as(cond.tokens))


def test_states_of_another_or_a_trained_encoder_are_refused(cache: tuple[Path, DiffusionModule]) -> None:
    latents, m = cache
    recorded = read_card(latents / "train")["text_encoder"]
    check_text_cache(recorded, m.text_encoder)  # its own: accepted
    other = module().text_encoder
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="another text encoder.*text_encoder_sha256"):
        check_text_cache(recorded, other)
    penultimate_vs_last = module().text_encoder
    penultimate_vs_last.layer = "last"
    with pytest.raises(ValueError, match="'layer': \\('penultimate', 'last'\\)"):
        check_text_cache(recorded, penultimate_vs_last)
    trained = module().text_encoder
    trained.freeze = False
    with pytest.raises(ValueError, match="trains its text encoder.*data.text_states=false"):
        check_text_cache(recorded, trained)
    with pytest.raises(ValueError, match="must be frozen"):
        cache_latents(m.autoencoder, str(latents / "train"), latents / "x", resolution=16, text_encoder=trained)


def test_training_start_refuses_the_states_of_another_encoder(cache: tuple[Path, DiffusionModule]) -> None:
    import lightning.pytorch as L

    latents, _ = cache
    m = module()  # the same autoencoder (seed 0) but the text tower perturbed
    with torch.no_grad():
        next(m.text_encoder.parameters()).add_(1e-3)
    dm = LatentDataModule(root=str(latents), resolution=16, batch_size=8, num_workers=0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    with pytest.raises(ValueError, match="another text encoder"):
        trainer.fit(m, datamodule=dm)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", limit_val_batches=0).fit(
        m, datamodule=LatentDataModule(root=str(latents), resolution=16, batch_size=8, num_workers=0,
                                       text_states=False))  # encoding the captions instead: trains


def test_a_cache_is_not_resumed_with_or_without_text_states(cache: tuple[Path, DiffusionModule],
                                                            tmp_path: Path) -> None:
    latents, m = cache
    shapes = latents.parent / "shapes" / "val"
    cache_latents(m.autoencoder, str(shapes), tmp_path / "plain", resolution=16, progress=False)
    with pytest.raises(ValueError, match="written without text states"):
        cache_latents(m.autoencoder, str(shapes), tmp_path / "plain", resolution=16, progress=False,
                      text_encoder=m.text_encoder)
    with pytest.raises(ValueError, match="with the states of another text encoder"):
        cache_latents(m.autoencoder, str(shapes), latents / "val", resolution=16, progress=False)


def _rewrite(shard: Path, out: Path, change: dict[str, bytes | None]) -> None:
    """A copy of `shard` with members replaced (bytes) or removed (None), by member name."""
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = change.get(member.name, src.extractfile(member).read())
            if data is None:
                continue
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_damaged_or_missing_text_states_are_skipped_and_counted(cache: tuple[Path, DiffusionModule],
                                                                tmp_path: Path) -> None:
    latents, _ = cache
    shard = sorted((latents / "val").glob("*.tar"))[0]
    with tarfile.open(shard) as t:
        keys = sorted({m.name.split(".")[0] for m in t.getmembers()})
    nan = io.BytesIO()
    np.save(nan, np.full(64, np.nan, dtype=np.float32))
    _rewrite(shard, tmp_path / "damaged.tar", {f"{keys[0]}.{TEXT_EXTENSIONS[0]}": b"not an array",
                                               f"{keys[1]}.{TEXT_EXTENSIONS[1]}": None,
                                               f"{keys[2]}.{TEXT_EXTENSIONS[1]}": nan.getvalue()})
    loader = ShardLoader(str(tmp_path / "damaged.tar"), batch_size=4, resolution=16, num_workers=0, shuffle=False,
                         drop_last=False, latents=True, text_states=True, samples_per_shard=len(keys))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == len(keys) - 3
    assert not {keys[0], keys[1], keys[2]} & {k for b in batches for k in b["key"]}
    assert max(b["skips"]["corrupt_latent"] for b in batches) == 3
    with pytest.raises(ValueError, match="needs latents=True"):
        ShardLoader(str(tmp_path / "damaged.tar"), batch_size=4, resolution=16, num_workers=0, text_states=True)


def test_the_cache_cli_builds_a_frozen_text_encoder_by_name_and_names_the_choices(tmp_path: Path) -> None:
    assert build_text_encoder(None) is None
    encoder = build_text_encoder("tiny")
    assert encoder.freeze and encoder.model_name == "ldm-tiny-text" and encoder.cache_size == 0
    with pytest.raises(FileNotFoundError, match="openclip_vit_h14.*tiny"):
        build_text_encoder("vit-h")
    trained = tmp_path / "trained.yaml"
    trained.write_text("_target_: ldm.models.text_encoder.openclip.OpenCLIPTextEncoder\nmodel_name: ldm-tiny-text\n"
                       "pretrained: null\nfreeze: false\ntrainable_layers: -1\n")
    with pytest.raises(ValueError, match="only a frozen one's states"):
        build_text_encoder(str(trained))


def test_the_cache_cli_writes_text_states(cache: tuple[Path, DiffusionModule], tmp_path: Path) -> None:
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    from ldm.cli.cache_latents import run
    from ldm.models.autoencoder.export import export_autoencoder

    latents, m = cache
    export_autoencoder(m.autoencoder, tmp_path / "export", resolution=16)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("cache_latents", overrides=[
            f"autoencoder={tmp_path / 'export'}", f"source={latents.parent / 'shapes'}", f"out={tmp_path / 'out'}",
            "resolution=16", "text_encoder=tiny", "dtype=float16", "device=cpu"])
    run(cfg)
    card = read_card(tmp_path / "out" / "train")
    assert card["text_encoder"]["model_name"] == "ldm-tiny-text" and card["dtype"] == "float16"
    batch = first_batch(tmp_path / "out")
    assert batch["text"][0].dtype == torch.float16 and batch["text"][0].shape == (8, 77, 64)


def test_latent_batches_are_pinned_by_the_loader_thread_on_cuda(cache: tuple[Path, DiffusionModule],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    latents, _ = cache
    shards = str(latents / "val")

    def pinned(pin_memory: bool, latents: bool = True) -> bool:
        return ShardLoader(shards, batch_size=4, resolution=16, num_workers=0, latents=latents,
                           pin_memory=pin_memory)._dataloader().pin_memory

    assert not pinned(True)  # no CUDA here: nothing to pin for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pinned(True) and not pinned(False)
    assert not pinned(True, latents=False)  # images: pinned after the float conversion, not as uint8
