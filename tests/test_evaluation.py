"""Evaluation metrics against exact answers and independent computations, offline: FID (scipy), KID's
unbiasedness, the CLIP-score path with a tiny random OpenCLIP model, reference statistics, and bad input."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.features import INCEPTION_URL, InceptionFeatures, RandomFeatures
from ldm.evaluation.metrics import FeatureStats, frechet_distance, kernel_distance, reconstruction_scores
from ldm.evaluation.runner import read_validation, reference_statistics
from ldm.utils import hub_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)) * 0.3 + torch.eye(dim)  # correlated
    return (torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) @ mix) * scale + shift


def stats(x: torch.Tensor, resolution: int = 32) -> FeatureStats:
    return FeatureStats.from_features(x, "test-features", resolution)


# ------------------------------------------------------------------ FID


def test_fid_of_a_set_with_itself_is_zero() -> None:
    s = stats(gaussian(300, 16, seed=0))
    assert abs(frechet_distance(s, s)) < 1e-6 * float(s.sigma.trace())


def test_fid_matches_an_independent_numpy_scipy_computation() -> None:
    a, b = gaussian(400, 16, seed=1), gaussian(350, 16, seed=2, shift=0.3, scale=1.5)
    x, y = a.numpy(), b.numpy()
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(stats(a), stats(b)) == pytest.approx(expected, rel=1e-4)


def test_fid_grows_with_the_shift() -> None:
    base = stats(gaussian(300, 8, seed=3))
    fids = [frechet_distance(base, stats(gaussian(300, 8, seed=4, shift=s))) for s in (0.0, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] == pytest.approx(8 * 1.0**2, rel=0.2)  # |mu shift|^2 dominates


# ------------------------------------------------------------------ KID


def test_kid_is_unbiased_on_random_splits_and_positive_for_a_shift() -> None:
    same, shifted = [], []
    for trial in range(20):
        pooled = gaussian(400, 8, seed=100 + trial)[torch.randperm(400, generator=torch.Generator().manual_seed(trial))]
        same.append(kernel_distance(pooled[:200], pooled[200:], subset_size=100, subsets=20, seed=trial)[0])
        other = gaussian(200, 8, seed=200 + trial, shift=0.5)
        shifted.append(kernel_distance(pooled[:200], other, subset_size=100, subsets=20, seed=trial)[0])
    same_t, shifted_t = torch.tensor(same), torch.tensor(shifted)
    stderr = float(same_t.std() / len(same) ** 0.5)
    assert abs(float(same_t.mean())) < 3 * stderr
    assert float(shifted_t.mean()) > 10 * stderr and float(shifted_t.min()) > 0


def test_kid_is_reproducible_for_a_seed() -> None:
    a, b = gaussian(100, 8, seed=5), gaussian(100, 8, seed=6, shift=0.2)
    assert kernel_distance(a, b, subset_size=50, subsets=10, seed=3) == kernel_distance(a, b, subset_size=50,
                                                                                      subsets=10, seed=3)


# ------------------------------------------------------------------ too few samples


def test_too_few_samples_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        stats(gaussian(1, 8, seed=0))
    with pytest.raises(ValueError, match=r"kid_subset_size=50 must be in \[2, 20\]"):
        kernel_distance(gaussian(20, 8, seed=0), gaussian(30, 8, seed=1), subset_size=50)
    with pytest.raises(ValueError, match="KID needs at least 2"):
        kernel_distance(gaussian(20, 8, seed=0), gaussian(1, 8, seed=1))
    assert kernel_distance(gaussian(20, 8, seed=0), gaussian(30, 8, seed=1), subsets=2)[0] == pytest.approx(
        kernel_distance(gaussian(20, 8, seed=0), gaussian(30, 8, seed=1), subset_size=20, subsets=2)[0])


def test_kid_whose_subsets_are_the_whole_set_warns_and_reports_no_std(caplog: pytest.LogCaptureFixture) -> None:
    a, b = gaussian(20, 8, seed=0), gaussian(20, 8, seed=1, shift=0.2)
    with caplog.at_level("WARNING", logger="ldm.evaluation.metrics"):
        mean, std = kernel_distance(a, b, subsets=5)  # subset_size null: min(1000, 20) = 20, every subset is all
    assert math.isnan(std) and mean == pytest.approx(kernel_distance(a, b, subset_size=20, subsets=5)[0])
    assert "kid_subset_size=null (min(1000, num_samples) = 20) equals the smaller of 20 real and 20 generated" \
        in caplog.text and "set kid_subset_size=10" in caplog.text and "null in the json" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.evaluation.metrics"):
        _, std_half = kernel_distance(a, b, subset_size=10, subsets=5)
    assert std_half > 1e-6 and not caplog.text  # subsets of half the set differ: a real spread, no warning


def test_fid_with_fewer_samples_than_features_warns() -> None:
    a, b = stats(gaussian(10, 16, seed=0)), stats(gaussian(10, 16, seed=1))
    with pytest.warns(UserWarning, match="rank-deficient"):
        frechet_distance(a, b)


def test_more_samples_than_the_shards_hold_is_a_clear_error(shapes_root: Path) -> None:
    with pytest.raises(ValueError, match="hold only 64 usable samples, fewer than num_samples=100"):
        read_validation(str(shapes_root / "val"), num_samples=100, resolution=32, batch_size=32)
    with pytest.raises(ValueError, match="at least 2"):
        read_validation(str(shapes_root / "val"), num_samples=1, resolution=32, batch_size=32)


# ------------------------------------------------------------------ reference statistics


def test_reference_statistics_roundtrip(tmp_path: Path) -> None:
    s = stats(gaussian(50, 8, seed=0))
    path = s.save(tmp_path / "ref.stats")  # any suffix: np.savez must not append ".npz"
    loaded = FeatureStats.load(path)
    assert (loaded.num_samples, loaded.extractor, loaded.resolution) == (50, "test-features", 32)
    assert torch.equal(loaded.mu, s.mu) and torch.equal(loaded.sigma, s.sigma)
    assert torch.allclose(loaded.features.double(), s.features, atol=1e-6)
    without = FeatureStats.from_features(gaussian(50, 8, seed=0), "test-features", 32, keep_features=False)
    assert FeatureStats.load(without.save(tmp_path / "small.npz")).features is None


def test_reference_statistics_of_another_resolution_or_extractor_are_refused(tmp_path: Path) -> None:
    loaded = FeatureStats.load(stats(gaussian(50, 8, seed=0), resolution=64).save(tmp_path / "ref.npz"))
    with pytest.raises(ValueError, match="computed from 64 px images, but the images evaluated here are 32 px"):
        loaded.check_compatible("test-features", 32)
    with pytest.raises(ValueError, match="feature extractor 'test-features'.*uses 'inception-v3-pool3'"):
        loaded.check_compatible("inception-v3-pool3", 64)
    loaded.check_compatible("test-features", 64)


def test_a_file_that_is_not_reference_statistics_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not an ldm reference-statistics file"):
        FeatureStats.load(tmp_path / "other.npz")


def test_reference_statistics_from_shards_are_written_then_reused(shapes_root: Path, tmp_path: Path) -> None:
    extractor = RandomFeatures(num_features=16)
    real = read_validation(str(shapes_root / "val"), num_samples=20, resolution=32, batch_size=8,
                           features=extractor)
    assert real.indices == list(range(20)) and len(real.captions) == 20 and all(real.captions)
    path = tmp_path / "ref.npz"
    made = reference_statistics(real, extractor, 32, path)
    assert path.is_file() and made.num_samples == 20 and made.features.shape == (20, 16)
    captions_only = read_validation(str(shapes_root / "val"), num_samples=20, resolution=32, batch_size=8)
    reused = reference_statistics(captions_only, extractor, 32, path)
    assert torch.allclose(reused.mu, made.mu) and captions_only.captions == real.captions
    with pytest.raises(ValueError, match="computed from 32 px images"):
        reference_statistics(captions_only, extractor, 64, path)


# ------------------------------------------------------------------ feature extractors


def test_random_features_are_deterministic_and_resolution_independent() -> None:
    smooth = torch.rand(3, 3, 4, 4) * 2 - 1
    images = torch.nn.functional.interpolate(smooth, size=32, mode="bilinear", align_corners=True)
    a, b = RandomFeatures(seed=0), RandomFeatures(seed=0)
    assert a(images).dtype == torch.float64 and a(images).shape == (3, 64)
    assert torch.equal(a(images), b(images))
    assert not torch.equal(a(images), RandomFeatures(seed=1)(images))
    big = torch.nn.functional.interpolate(smooth, size=64, mode="bilinear", align_corners=True)
    assert torch.allclose(a(big), a(images), atol=0.02)
    assert a.name != RandomFeatures(seed=1).name


@pytest.fixture
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in hub_weights.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_offline_inception_without_a_local_file_fails_fast(empty_torch_hub: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_weights, "hub_reachable", lambda *a, **k: pytest.fail("probed the network"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="features.weights=/path/to/weights-inception-2015-12-05") as info:
        InceptionFeatures()
    assert time.perf_counter() - start < 1.0
    assert "HF_HUB_OFFLINE is set" in str(info.value) and INCEPTION_URL in str(info.value)


def test_unreachable_download_host_fails_fast(empty_torch_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = []
    monkeypatch.setattr(hub_weights, "hub_reachable", lambda host, port, **_: probed.append(host) or False)
    with pytest.raises(RuntimeError, match="github.com is unreachable"):
        InceptionFeatures()
    assert probed == ["github.com"]


def test_missing_inception_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="set by features.weights"):
        InceptionFeatures(weights=str(tmp_path / "nope.pth"))


def test_inception_loads_a_local_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    # A randomly initialised network saved like the real file: build it without loading any weights.
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.save(fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(),
               tmp_path / "inception.pth")
    monkeypatch.undo()
    extractor = InceptionFeatures(weights=str(tmp_path / "inception.pth"))
    out = extractor(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 2048) and out.dtype == torch.float64 and out.isfinite().all()
    assert extractor.name == "inception-v3-pool3"


# ------------------------------------------------------------------ CLIP score


@pytest.fixture(scope="module")
def tiny_clip() -> CLIPScore:
    return CLIPScore("ldm-tiny-text", pretrained=None)


def test_clip_score_path_runs(tiny_clip: CLIPScore) -> None:
    images = torch.rand(3, 3, 48, 40) * 2 - 1  # not square, not the model's size
    assert tiny_clip.preprocess(images).shape == (3, 3, 32, 32)
    scores = tiny_clip(images, ["a red circle", "a blue square", ""])
    assert scores.shape == (3,) and scores.dtype == torch.float64
    assert bool(((scores >= 0) & (scores <= 100)).all())
    assert torch.allclose(tiny_clip(images[:1], ["a red circle"]), scores[:1], atol=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        tiny_clip(images, ["only one"])


def test_clip_score_is_cosine_times_100(tiny_clip: CLIPScore) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    model = tiny_clip.model
    with torch.no_grad():
        i = model.encode_image(tiny_clip.preprocess(images))
        t = model.encode_text(tiny_clip.tokenizer(["a", "b"]))
    cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
    assert torch.allclose(tiny_clip(images, ["a", "b"]).float(), 100 * cos.clamp(min=0), atol=1e-3)


def test_offline_clip_weights_fail_fast_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_CACHE", "LDM_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="clip.pretrained=/path/to/open_clip_pytorch_model.bin"):
        CLIPScore("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ValueError, match="Unknown OpenCLIP model"):
        CLIPScore("ViT-Q-99", pretrained=None)


# ------------------------------------------------------------------ autoencoder metrics


def test_reconstruction_scores_match_their_definitions() -> None:
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    scores = reconstruction_scores(images, noisy, lpips=lambda x, y: (x - y).abs().flatten(1).mean(1))
    mse = (((noisy + 1) / 2 - (images + 1) / 2) ** 2).flatten(1).mean(1).double()
    assert torch.allclose(scores["psnr"], -10 * torch.log10(mse), atol=1e-3)
    assert scores["ssim"].shape == (4,) and bool((scores["ssim"] < 1).all())
    assert reconstruction_scores(images, images)["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert set(scores) == {"psnr", "ssim", "lpips"}


# ------------------------------------------------------------------ configs


def test_configs_build_the_smoke_extractors(shapes_root: Path) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=x", f"shards={shapes_root}/val", "features=random", "clip=tiny"])
        assert cfg.features._target_.endswith("RandomFeatures") and cfg.clip.model_name == "ldm-tiny-text"
        assert isinstance(instantiate(cfg.features), RandomFeatures)
        train = compose("train", overrides=[
            "experiment=ldm_tiny", "callbacks=[default,ema,evaluate]", f"callbacks.evaluate.shards={shapes_root}/val",
            "~callbacks.evaluate.clip_score", "callbacks.evaluate.metrics=[fid]", "~callbacks.evaluate.features",
            "+callbacks.evaluate.features={_target_:ldm.evaluation.features.RandomFeatures}"])
    callback = instantiate(train.callbacks.evaluate)
    assert isinstance(callback.features, RandomFeatures) and callback.clip_score is None
    with pytest.raises(InstantiationException, match="clip_score needs"):
        instantiate(train.callbacks.evaluate, metrics=["clip_score"])
