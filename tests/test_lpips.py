"""LPIPS wrapper: loads VGG16 from a local file, fails fast and clearly when it cannot get the weights."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ldm.models.autoencoder import lpips as lpips_module
from ldm.models.autoencoder.lpips import CONFIG_KEY, LPIPS
from ldm.utils import hub_weights


@pytest.fixture(scope="module")
def lpips(vgg_file: Path) -> LPIPS:
    return LPIPS(vgg_weights=str(vgg_file))


def test_distance_zero_for_identical_positive_otherwise(lpips: LPIPS) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_frozen_eval_and_out_of_state_dict(lpips: LPIPS) -> None:
    from torchmetrics.functional.image import lpips as tm_lpips

    assert lpips.train().training is False and lpips.net.training is False
    assert list(lpips.parameters()) == [] and lpips.state_dict() == {}
    assert not any(p.requires_grad for p in lpips.net.parameters())
    heads = torch.load(Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth", map_location="cpu")
    torch.testing.assert_close(lpips.net.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert lpips.to(torch.float64).net.lin0.model[1].weight.dtype == torch.float64
    lpips.to(torch.float32)


def test_loads_the_given_vgg_weights(lpips: LPIPS, vgg_file: Path) -> None:
    saved = torch.load(vgg_file)
    torch.testing.assert_close(lpips.net.net.slice3.state_dict()["10.weight"], saved["features.10.weight"])


def test_missing_file_names_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_KEY):
        LPIPS(vgg_weights=str(tmp_path / "nope.pth"))


def test_wrong_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="VGG16"):
        LPIPS(vgg_weights=str(path))


def test_offline_env_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"{CONFIG_KEY}=/path/to/vgg16.pth"):
        LPIPS()
    assert time.perf_counter() - start < 1.0


def test_unreachable_host_fails_within_probe_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in hub_weights.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so the connect hangs until the probe gives up.
    monkeypatch.setattr(lpips_module, "_PROBE_HOST", ("192.0.2.1", 443))
    monkeypatch.setattr(lpips_module, "_PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable"):
        LPIPS()
    assert time.perf_counter() - start < 2.0


def test_uses_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vgg_file: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # must not matter when the file is cached
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(lpips_module.VGG16_URL).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(vgg_file.read_bytes())
    assert LPIPS().net is not None
