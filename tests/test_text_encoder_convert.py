"""OpenCLIP text tower <-> transformers' CLIPTextModel, and CLIPTokenizer files written from open_clip's vocabulary:
transformers' tokenizer and model, built from the conversion alone, must give our token ids and our token states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.tokenizer import basic_clean
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.models.text_encoder.convert import (
    clip_text_to_openclip,
    openclip_to_clip_text,
    write_clip_tokenizer,
    write_openclip_config,
)
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "a large red circle on a white background",
    "",  # the unconditional prompt
    "Hello, World!!! (test) -- ok? a!b; x:y, \"quoted\" 'single' it's we'll",  # punctuation, the pad symbol "!"
    "café ☕ 日本語 naïve Ünïcödé 😀👍🏽 e\u0301 a\u00a0b",  # unicode, combining marks, a no-break space
    "  Spaces\tand\nnewlines   EVERYWHERE  ",
    "word " * 100,  # truncated at 77: SOT + 75 tokens + EOT
    "Tom's 3.5 kg <|endoftext|> 1234567",
]
# open_clip cleans text (ftfy, html.unescape) before BPE; transformers does not: these differ unless pre-cleaned
NEEDS_CLEANING = ["fish &amp; chips", "mojibake: Ã©", "ligature: ﬁne"]


@pytest.fixture(scope="module")
def encoder() -> OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer="penultimate")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder = write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in folder.iterdir()}
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    # how diffusers' StableDiffusionPipeline calls its tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def test_tokenizer_files_give_open_clip_ids(tokenizer: CLIPTokenizer, encoder: OpenCLIPTextEncoder) -> None:
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 0
    with pytest.warns(UserWarning, match="truncated"):
        ours = encoder.tokenize(PROMPTS)
    theirs = ids(tokenizer, PROMPTS)
    for prompt, a, b in zip(PROMPTS, theirs, ours, strict=True):
        assert torch.equal(a, b), prompt
    assert ours[5, -1] == 49407 and (ours[1, 2:] == 0).all()  # truncation ends in EOT; "" is SOT EOT + padding


def test_tokenizer_differs_only_by_open_clips_text_cleaning(tokenizer: CLIPTokenizer,
                                                            encoder: OpenCLIPTextEncoder) -> None:
    ours = encoder.tokenize(NEEDS_CLEANING)
    assert not any(torch.equal(a, b) for a, b in zip(ids(tokenizer, NEEDS_CLEANING), ours, strict=True))
    assert torch.equal(ids(tokenizer, [basic_clean(p) for p in NEEDS_CLEANING]), ours)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_clip_text_model_gives_our_states(layer: str, tokenizer: CLIPTokenizer) -> None:
    torch.manual_seed(1)
    encoder = OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer=layer)
    config, state = openclip_to_clip_text(encoder)
    assert config["num_hidden_layers"] == (1 if layer == "penultimate" else 2)  # SD 2.x: one block fewer
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    model.load_state_dict(state, strict=True)
    prompts = PROMPTS[:5]
    with torch.no_grad():
        theirs = model(ids(tokenizer, prompts)).last_hidden_state
    torch.testing.assert_close(theirs, encoder.encode(prompts).tokens, atol=1e-5, rtol=1e-5)


def test_round_trip_through_transformers_is_exact(encoder: OpenCLIPTextEncoder, tmp_path: Path) -> None:
    """ours -> CLIPTextModelWithProjection (a full tower, projection included) -> ours: every tensor unchanged."""
    full = OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer="last")
    full.text.load_state_dict(encoder.text.state_dict())
    config, state = openclip_to_clip_text(full)
    state = {f"text_model.{k}": v for k, v in state.items()}  # the tower sits under text_model. in this class
    state["text_projection.weight"] = full.text.text_projection.detach().T  # (P, D) in transformers
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    model.load_state_dict(state, strict=True)
    theirs = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    openclip_config, back = clip_text_to_openclip(model.config.to_dict(), theirs)
    write_openclip_config(tmp_path, "roundtrip-text", openclip_config)
    rebuilt = OpenCLIPTextEncoder("roundtrip-text", pretrained=None, layer="last", model_config_dir=str(tmp_path))
    rebuilt.text.load_state_dict(back, strict=True)
    for key, value in full.text.state_dict().items():
        assert torch.equal(rebuilt.text.state_dict()[key], value), key
    a, b = rebuilt.encode(PROMPTS[:3]), full.encode(PROMPTS[:3])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_import_of_an_sd2_style_tower_reproduces_its_hidden_states(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    """A transformers CLIPTextModel (random, saved with the old `text_model.` keys, as SD 2.x's text_encoder/) ->
    ours with layer="last": the same states the diffusers pipeline conditions on; the pooled projection is zero."""
    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=16)
    model = CLIPTextModel(config).eval()
    state = {f"text_model.{k}": v for k, v in model.state_dict().items() if "position_ids" not in k}
    openclip_config, ours_state = clip_text_to_openclip(config.to_dict(), state)
    write_openclip_config(tmp_path, "sd2-like-text", openclip_config)
    encoder = OpenCLIPTextEncoder("sd2-like-text", pretrained=None, layer="last", model_config_dir=str(tmp_path))
    encoder.text.load_state_dict(ours_state, strict=True)
    with torch.no_grad():
        expected = model(ids(tokenizer, PROMPTS[:3])).last_hidden_state
    cond = encoder.encode(PROMPTS[:3])
    torch.testing.assert_close(cond.tokens, expected, atol=1e-5, rtol=1e-5)
    assert cond.pooled.shape == (3, 16) and not cond.pooled.any()


def test_bad_input_is_named(encoder: OpenCLIPTextEncoder) -> None:
    config, state = openclip_to_clip_text(encoder)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        clip_text_to_openclip({**config, "hidden_act": "relu"}, state)
    with pytest.raises(ValueError, match="vocab_size=32000"):
        clip_text_to_openclip({**config, "vocab_size": 32000}, state)
    no_mask = OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    no_mask.text.attn_mask = None
    with pytest.raises(ValueError, match="no causal mask"):
        openclip_to_clip_text(no_mask)
