"""OpenCLIP text encoder: shapes, parity with open_clip's own CLIP, freezing, weights on disk, offline failures."""

from __future__ import annotations

import pickle
import socket
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.models.backbone import Conditioning
from ldm.models.text_encoder import openclip as oc
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder

TINY = "ldm-tiny-text"
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", ""]
LONG_PROMPT = " ".join(["word"] * 100)


def tiny(**kwargs) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder(TINY, **{"pretrained": None, **kwargs})


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """open_clip's own full CLIP (visual tower included) for the tiny config, and its state dict on disk."""
    oc.register_config_dir(oc.CONFIG_DIR)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)
    return clip, path


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------


def test_shapes_and_properties() -> None:
    encoder = tiny()
    out = encoder.encode(PROMPTS)
    assert isinstance(out, Conditioning)
    assert out.tokens.shape == (3, 77, 64)
    assert out.pooled.shape == (3, 64)
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, 77)
    assert out.mask[2].sum() == 2  # "" is SOT + EOT
    assert (encoder.width, encoder.context_length, encoder.pooled_dim) == (64, 77, 64)
    assert not hasattr(encoder, "visual") and all(not n.startswith("visual") for n in encoder.state_dict())
    clone = pickle.loads(pickle.dumps(encoder))  # DDP spawn, torch.save(model)
    torch.testing.assert_close(clone.encode(PROMPTS).tokens, out.tokens, rtol=0, atol=0)


def test_matches_open_clip_encode_text_and_intermediates(clip_checkpoint) -> None:
    clip, path = clip_checkpoint
    penultimate = OpenCLIPTextEncoder(TINY, pretrained=str(path), layer="penultimate")
    last = OpenCLIPTextEncoder(TINY, pretrained=str(path), layer="last")
    tokens = penultimate.tokenize(PROMPTS)
    assert torch.equal(tokens, open_clip.get_tokenizer(TINY)(PROMPTS))
    with torch.no_grad():
        expected_pooled = clip.encode_text(tokens)
        ref = clip.forward_intermediates(text=tokens, text_indices=[0, 1], normalize_intermediates=True,
                                         intermediates_only=True)["text_intermediates"]  # ln_final(block i)
    out_p, out_l = penultimate(tokens), last(tokens)
    torch.testing.assert_close(out_p.pooled, expected_pooled)
    torch.testing.assert_close(out_l.pooled, expected_pooled)
    torch.testing.assert_close(out_p.tokens, ref[0])
    torch.testing.assert_close(out_l.tokens, ref[1])
    assert not torch.allclose(out_p.tokens, out_l.tokens)


def test_shorter_token_batches_match_a_prefix_of_the_full_context() -> None:
    encoder = tiny()
    tokens = encoder.tokenize(PROMPTS[:2])
    full, short = encoder(tokens), encoder(tokens[:, :20])
    torch.testing.assert_close(short.tokens, full.tokens[:, :20])  # causal attention
    torch.testing.assert_close(short.pooled, full.pooled)
    with pytest.raises(ValueError, match="L<=77"):
        encoder(torch.zeros(1, 78, dtype=torch.long))


def test_null_embedding_is_the_empty_prompt_and_cached_when_frozen() -> None:
    encoder = tiny()
    null = encoder.null_embedding()
    torch.testing.assert_close(null.tokens, encoder.encode([""]).tokens, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled, encoder.encode([""]).pooled, rtol=0, atol=0)
    assert encoder.null_embedding().tokens.data_ptr() == null.tokens.data_ptr()  # cached
    batch = encoder.null_embedding(4)
    assert batch.tokens.shape == (4, 77, 64) and torch.equal(batch.tokens[3], null.tokens[0])
    other = tiny()  # other random weights: loading them must drop the cache
    encoder.load_state_dict(other.state_dict())
    torch.testing.assert_close(encoder.null_embedding().tokens, other.null_embedding().tokens)


def test_null_embedding_is_recomputed_and_differentiable_when_trainable() -> None:
    encoder = tiny(freeze=False, trainable_layers=-1)
    first = encoder.null_embedding()
    assert first.tokens.requires_grad
    with torch.no_grad():
        encoder.text.ln_final.bias.add_(1.0)
    assert not torch.allclose(encoder.null_embedding().tokens, first.tokens)


def test_truncation_warns_once_per_encoder() -> None:
    encoder = tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode(PROMPTS)
        assert not caught
        tokens = encoder.tokenize([LONG_PROMPT, "short"])
        encoder.encode([LONG_PROMPT])
    assert len(caught) == 1
    assert "truncated to 77" in str(caught[0].message) and "1 of 2 prompts" in str(caught[0].message)
    assert tokens.shape == (2, 77) and tokens[0, -1] == 49407  # open_clip's truncation ends with EOT
    assert torch.equal(tokens, open_clip.get_tokenizer(TINY)([LONG_PROMPT, "short"]))
    with pytest.warns(UserWarning, match="truncated"):
        tiny().encode([LONG_PROMPT])  # a second encoder warns again


# ----------------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------------


def test_frozen_stays_frozen() -> None:
    encoder = tiny()
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    torch.nn.Sequential(encoder).train()  # as a child of a LightningModule
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    out = encoder.encode(["a cat"])
    assert not out.tokens.requires_grad and not out.pooled.requires_grad


def test_trainable_last_block() -> None:
    encoder = tiny(freeze=False, trainable_layers=1)
    assert encoder.training
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    expected = {n for n, _ in encoder.named_parameters() if n.startswith(("text.transformer.resblocks.1.", "text.ln_final."))}
    assert trainable == expected and expected
    out = encoder.encode(["a cat"])
    (out.tokens.sum() + out.pooled.sum()).backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in encoder.named_parameters() if n not in trainable)


def test_trainable_all_and_invalid_combinations() -> None:
    encoder = tiny(freeze=False, trainable_layers=-1)
    assert all(p.requires_grad for p in encoder.parameters())
    for kwargs in (dict(freeze=True, trainable_layers=1), dict(freeze=False, trainable_layers=0),
                   dict(freeze=False, trainable_layers=3), dict(layer="middle")):
        with pytest.raises(ValueError):
            tiny(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Weights on disk
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["encoder.pt", "encoder.safetensors"])
def test_load_local_state_dict(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    source = tiny()
    path = tmp_path / fmt
    state = {k: v.contiguous() for k, v in source.state_dict().items()}  # keys "text.*", like CustomTextCLIP
    save_file(state, path) if fmt.endswith(".safetensors") else torch.save(state, path)
    loaded = OpenCLIPTextEncoder(TINY, pretrained=str(path))
    a, b = source.encode(PROMPTS), loaded.encode(PROMPTS)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_shorter_context_keeps_first_positions(clip_checkpoint) -> None:
    _, path = clip_checkpoint
    full = OpenCLIPTextEncoder(TINY, pretrained=str(path))
    short = OpenCLIPTextEncoder(TINY, pretrained=str(path), context_length=32)
    assert short.tokenize(["a cat"]).shape == (1, 32)
    torch.testing.assert_close(short.encode(["a cat"]).tokens, full.encode(["a cat"]).tokens[:, :32])


def test_missing_local_file_and_wrong_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.text_encoder.pretrained"):
        tiny(pretrained=str(tmp_path / "missing.bin"))
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "vision_only.bin")
    with pytest.raises(ValueError, match="text tower"):
        tiny(pretrained=str(tmp_path / "vision_only.bin"))


# ----------------------------------------------------------------------------------------------------
# Names, tags and offline behaviour
# ----------------------------------------------------------------------------------------------------


def test_unknown_model_and_tag_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="ViT-B-32") as info:
        OpenCLIPTextEncoder("ViT-Q-99", pretrained=None)
    assert "ViT-H-14" in str(info.value)
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        OpenCLIPTextEncoder("ViT-B-32", pretrained="no_such_tag")


@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "LDM_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache ~/.cache/clip is empty too
    return tmp_path / "hf"


def _fails_fast(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        OpenCLIPTextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "model.text_encoder.pretrained=" in message and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    return message


def test_offline_tag_fails_fast_with_hf_hub_offline(empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(oc, "hub_reachable", lambda *a, **k: pytest.fail("probed the network"))
    assert "HF_HUB_OFFLINE" in _fails_fast(monkeypatch)


def test_offline_tag_fails_fast_when_hub_unreachable(empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = []
    monkeypatch.setattr(oc, "hub_reachable", lambda host, port: probed.append((host, port)) or False)
    assert "unreachable" in _fails_fast(monkeypatch)
    assert probed == [("huggingface.co", 443)]


def test_tag_resolves_to_hub_cache_without_network(empty_hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hf_home / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stub")
    assert oc.resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k") == str(weights)


def test_probe_reports_open_and_closed_ports() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert oc.hub_reachable("127.0.0.1", port, timeout=1.0)
    start = time.perf_counter()
    assert not oc.hub_reachable("127.0.0.1", port, timeout=1.0)  # closed now: refused at once
    assert time.perf_counter() - start < 1.5


# ----------------------------------------------------------------------------------------------------
# Full size
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_h14_text_tower_random_init() -> None:
    encoder = OpenCLIPTextEncoder("ViT-H-14", pretrained=None)
    params = sum(p.numel() for p in encoder.parameters())
    assert 350e6 < params < 358e6  # text tower only; the visual tower would add ~630 M
    assert (encoder.width, encoder.pooled_dim, encoder.context_length) == (1024, 1024, 77)
    out = encoder.encode(["a photo of a cat"])
    assert out.tokens.shape == (1, 77, 1024) and out.pooled.shape == (1, 1024)


def test_prompt_cache_is_exact_bounded_and_recency_ordered() -> None:
    torch.manual_seed(0)
    cached, plain = tiny(cache_size=3), tiny()
    plain.load_state_dict(cached.state_dict())
    batch = ["a red circle", "a blue star", "a red circle", ""]
    first = cached.encode(batch)
    for got, want in zip(first, plain.encode(batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # another batch size: rounding (1.5e-6)
    for i, prompt in enumerate(batch):  # bit for bit the prompt encoded alone, whatever batch it came in
        assert all(torch.equal(got[i], want[0]) for got, want in zip(first, plain.encode([prompt])))
    assert list(cached._cache) == ["a blue star", "a red circle", ""]  # 3 distinct, last used last
    calls = []
    cached.text.token_embedding.register_forward_hook(lambda *args: calls.append(args[1][0].shape[0]))
    again = cached.encode(["", "a red circle"])  # all cached: the tower does not run
    assert calls == [] and torch.equal(again.tokens[1], first.tokens[0]) and torch.equal(again.pooled[0], first.pooled[3])
    cached.encode(["a green cross", "a red circle", "a blue square"])  # unseen prompts are encoded one at a time
    assert calls == [1, 1] and list(cached._cache) == ["a green cross", "a red circle", "a blue square"]  # LRU out


def test_prompt_cache_follows_new_weights_and_autocast() -> None:
    encoder = tiny(cache_size=8)
    before = encoder.encode(["a red circle"]).tokens
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)
    assert not torch.equal(encoder.encode(["a red circle"]).tokens, before)  # not the stale encoding
    plain = tiny()
    plain.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = encoder.encode(["a red circle"]).tokens
        torch.testing.assert_close(under, plain.encode(["a red circle"]).tokens)  # dtype included
    torch.testing.assert_close(encoder.encode(["a red circle"]).tokens, plain.encode(["a red circle"]).tokens)
    assert not torch.equal(under.float(), plain.encode(["a red circle"]).tokens)  # not the autocast encoding


def test_prompt_cache_needs_a_frozen_encoder() -> None:
    with pytest.raises(ValueError, match="cache_size must be >= 0 and needs freeze=true"):
        tiny(cache_size=4, freeze=False, trainable_layers=-1)
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        tiny(cache_size=-1)
