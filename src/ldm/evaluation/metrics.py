"""FID (Heusel et al., 2017, arXiv:1706.08500), KID (Binkowski et al., 2018, arXiv:1801.01401) and the
reconstruction metrics of an autoencoder, on features from `ldm.evaluation.features`; the statistics are
torchmetrics'. Reference statistics (mean, covariance and, for KID, the features) are saved to an `.npz` and
refused later when they came from another feature extractor or resolution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import KernelInceptionDistance

from ldm.utils.logging import get_logger

log = get_logger(__name__)
MIN_SAMPLES = 2  # an unbiased covariance (FID) and the unbiased MMD estimate (KID) need two samples per set
KID_SUBSET_SIZE = 1000  # Binkowski et al.'s default; shrunk to the set sizes when not given explicitly


@dataclass
class FeatureStats:
    """Mean and covariance of a set of image features, and the features themselves when kept (KID needs them)."""

    mu: Tensor  # (D,) float64
    sigma: Tensor  # (D, D) float64, unbiased (n - 1)
    num_samples: int
    extractor: str  # FeatureExtractor.name
    resolution: int | None  # the side of the images the features came from
    features: Tensor | None = None  # (N, D)

    @classmethod
    def from_features(cls, features: Tensor, extractor: str, resolution: int | None,
                      keep_features: bool = True) -> FeatureStats:
        features = features.double().cpu()
        check_samples(len(features), "FID", "features")
        return cls(features.mean(0), torch.cov(features.T).reshape(features.shape[1], -1), len(features), extractor,
                   resolution, features if keep_features else None)

    def save(self, path: str | Path) -> Path:
        """An `.npz` with `mu` and `sigma` as pytorch-fid writes them, plus `num_samples`, `extractor`,
        `resolution` and, when kept, `features` (float32)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu.numpy(), "sigma": self.sigma.numpy(), "num_samples": np.int64(self.num_samples),
                  "extractor": np.str_(self.extractor), "resolution": np.int64(self.resolution or 0)}
        if self.features is not None:
            arrays["features"] = self.features.float().numpy()
        with path.open("wb") as f:  # a file object: np.savez would otherwise append ".npz" to other names
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {path} do not exist")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "num_samples", "extractor", "resolution"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not an ldm reference-statistics file: no {sorted(missing)} (it holds "
                                 f"{data.files}); write one with scripts/evaluate.py reference={path}")
            features = torch.from_numpy(data["features"]) if "features" in data.files else None
            return cls(torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double(),
                       int(data["num_samples"]), str(data["extractor"]), int(data["resolution"]) or None, features)

    def check_compatible(self, extractor: str, resolution: int | None, where: str = "the reference statistics") -> None:
        """Refuse to compare with features of another extractor or images of another resolution."""
        if self.extractor != extractor:
            raise ValueError(f"{where} were computed with the feature extractor {self.extractor!r}, but this "
                             f"evaluation uses {extractor!r}: their FIDs are not comparable. Recompute them (delete "
                             "the file, or point reference= at a new path) with this extractor.")
        if self.resolution and resolution and self.resolution != resolution:
            raise ValueError(f"{where} were computed from {self.resolution} px images, but the images evaluated "
                             f"here are {resolution} px. Recompute them at {resolution} px (delete the file, or "
                             "point reference= at a new path), or evaluate at the reference's resolution.")


def check_samples(n: int, metric: str, what: str, needed: int = MIN_SAMPLES) -> None:
    if n < needed:
        raise ValueError(f"{metric} needs at least {needed} {what}, got {n}: raise num_samples (FID is commonly "
                         "reported on 10k-50k images; a few hundred give only a rough, upward-biased estimate).")


def frechet_distance(real: FeatureStats, fake: FeatureStats) -> float:
    """FID, eq. (6) of Heusel et al.: |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), by torchmetrics."""
    for stats, what in ((real, "real images"), (fake, "generated images")):
        check_samples(stats.num_samples, "FID", what)
    dim = len(real.mu)
    if len(fake.mu) != dim:
        raise ValueError(f"feature sizes differ: {dim} (real) and {len(fake.mu)} (generated)")
    small = min(real.num_samples, fake.num_samples)
    if small <= dim:
        warnings.warn(f"FID from {small} samples of {dim}-d features: the covariance is rank-deficient and FID "
                      "is biased upward; compare it only with FIDs from the same number of samples.", stacklevel=2)
    return float(_compute_fid(real.mu, real.sigma, fake.mu, fake.sigma))


def kernel_distance(real: Tensor, fake: Tensor, *, subset_size: int | None = None, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al., eq. 6, cubic polynomial kernel): mean and std of the unbiased MMD^2 over `subsets`
    random subsets of `subset_size` features of each set (torchmetrics), reproducible for a given `seed`.

    Args:
        subset_size: None: min(1000, both set sizes); an explicit value larger than a set is refused. When it
            equals the smaller set, every subset of that set is the whole set and the subsets' spread no longer
            measures the estimate's uncertainty: the std is then NaN (null in the json), with a warning.
    """
    n_real, n_fake = len(real), len(fake)
    for n, what in ((n_real, "real images"), (n_fake, "generated images")):
        check_samples(n, "KID", what)
    smaller = min(n_real, n_fake)
    setting = f"kid_subset_size={subset_size}"
    if subset_size is None:
        subset_size = min(KID_SUBSET_SIZE, smaller)
        setting = f"kid_subset_size=null (min({KID_SUBSET_SIZE}, num_samples) = {subset_size})"
    elif not MIN_SAMPLES <= subset_size <= smaller:
        raise ValueError(f"kid_subset_size={subset_size} must be in [{MIN_SAMPLES}, {smaller}] "
                         f"(the smaller of {n_real} real and {n_fake} generated samples): lower it, or raise "
                         "num_samples.")
    with warnings.catch_warnings():  # "will save all extracted features": they are ours already
        warnings.filterwarnings("ignore", message=".*save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=subset_size,
                                         sync_on_compute=False)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    if subset_size == smaller:  # every subset of the smaller set is that set: the spread measures no uncertainty
        log.warning(f"KID: {setting} equals the smaller of {n_real} real and {n_fake} generated samples "
                    "(num_samples), so every KID subset of that set is the whole set and the spread over subsets "
                    "(kid_std) says nothing about the uncertainty of kid_mean: kid_std is reported as NaN (null in "
                    f"the json). For a meaningful std set kid_subset_size={max(MIN_SAMPLES, smaller // 2)} (at most "
                    "half of num_samples), or raise num_samples above kid_subset_size (above "
                    f"{KID_SUBSET_SIZE} with kid_subset_size=null).")
        return float(mean), float("nan")
    return float(mean), float(std)


def reconstruction_scores(images: Tensor, reconstructions: Tensor, lpips: nn.Module | None = None
                          ) -> dict[str, Tensor]:
    """Per-image PSNR (dB) and SSIM on [0, 1] (torchmetrics), and LPIPS when given; each (B,) on the CPU."""
    x, y = (reconstructions.float().clamp(-1, 1) + 1) / 2, (images.float().clamp(-1, 1) + 1) / 2
    scores = {"psnr": peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)),
              "ssim": structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")}
    if lpips is not None:
        scores["lpips"] = lpips(reconstructions.float(), images.float())
    return {k: v.detach().double().cpu().reshape(len(images)) for k, v in scores.items()}
