"""The conf/sampling/ group: one set of keys in sample.yaml, evaluate.yaml and both sampling callbacks, checked at
start-up by SamplingOptions, every option reachable from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.conf import CONF_DIR
from ldm.inference.sampling_options import SamplingOptions

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "sampling").glob("*.yaml"))


def config(name: str, *overrides: str):
    required = {"sample": ["ckpt=x"], "evaluate": ["ckpt=x", "shards=y"],
                "train": ["experiment=ldm_tiny", "+callbacks=evaluate", "callbacks.evaluate.shards=y"]}[name]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=[*required, *overrides])


def test_presets_are_the_expected_ones() -> None:
    assert PRESETS == ["apg", "cfg_zero_star", "default", "interval"]


@pytest.mark.parametrize("preset", PRESETS)
def test_one_group_gives_the_same_settings_everywhere(preset: str) -> None:
    """sample.py and evaluate.py read the group at the top level, the callbacks under `sampling` (25 steps there)."""
    sample = SamplingOptions.from_config(config("sample", f"sampling={preset}"))
    evaluate = SamplingOptions.from_config(config("evaluate", f"sampling={preset}"))
    train = config("train", f"sampling@callbacks.sample_images.sampling={preset}",
                   f"sampling@callbacks.evaluate.sampling={preset}")
    callbacks = [SamplingOptions.from_config(train.callbacks[name].sampling) for name in ("sample_images", "evaluate")]
    assert sample == evaluate
    assert all(c == SamplingOptions.from_config(config("sample", f"sampling={preset}", "steps=25")) for c in callbacks)
    assert sample.guidance_method == {"apg": "apg", "cfg_zero_star": "cfg_zero_star"}.get(preset, "cfg")
    assert (sample.guidance_interval is not None) == (preset == "interval")


def test_every_option_reaches_generate_from_the_command_line() -> None:
    cfg = config("sample", "sampler=ddim", "sampler_options.eta=0.5", "guidance=3", "guidance_method=apg",
                 "guidance_options.momentum=-0.5", "guidance_options.norm_threshold=4",
                 "guidance_interval=[0.5,inf]", "guidance_rescale=0.7", "precision=bf16", "steps=12")
    kwargs = SamplingOptions.from_config(cfg).generate_kwargs()
    assert kwargs == {"sampler": "ddim", "steps": 12, "spacing": "auto", "sampler_options": {"eta": 0.5},
                      "guidance": 3.0, "guidance_method": "apg",
                      "guidance_options": {"momentum": -0.5, "norm_threshold": 4.0},
                      "guidance_interval": (0.5, float("inf")), "guidance_rescale": 0.7, "precision": "bf16"}


def test_callbacks_build_with_the_group(tmp_path: Path) -> None:
    train = config("train", "callbacks.sample_images.sampling.guidance_method=cfg_zero_star",
                   "callbacks.sample_images.sampling.sampler_options.order=2")
    callback = instantiate(train.callbacks.sample_images)
    assert callback.options["guidance_method"] == "cfg_zero_star" and callback.options["steps"] == 25
    assert callback.options["sampler_options"] == {"order": 2}


@pytest.mark.parametrize("overrides,message", [
    (["sampler=dpmpp_4m"], "unknown sampler 'dpmpp_4m'; expected one of"),
    (["sampler=unipc", "sampler_options.eta=0.5"], r"sampler 'unipc' takes no option eta; its options are \['order'\]"),
    (["sampler_options.eta=0.5"], "sampler 'unipc' takes no option eta"),  # auto: unipc at 30 steps
    (["steps=10", "sampler_options.s_noise=1.0"], "sampler 'deis' takes no option s_noise"),
    (["steps=0"], "steps must be >= 1"),
    (["spacing=cosine"], "unknown spacing 'cosine'; expected auto or one of"),
    (["guidance_method=pag"], "unknown guidance method 'pag'"),
    (["guidance_options.momentum=0.5"], r"guidance method 'cfg' takes no option momentum; its options are none"),
    (["sampling=apg", "guidance_options.zero_init_steps=2"], "guidance method 'apg' takes no option zero_init_steps"),
    (["guidance_interval=[5,1]"], "guidance_interval must be"),
    (["guidance_interval=[1]"], "guidance_interval must be"),
    (["guidance_rescale=1.5"], r"guidance_rescale must be in \[0, 1\]"),
    (["precision=fp8"], "precision must be one of"),
])
def test_bad_settings_are_clear_errors_at_start_up(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingOptions.from_config(config("sample", *overrides))


def test_sample_cli_checks_the_settings_before_loading(tmp_path: Path) -> None:
    """A bad option fails before the checkpoint (which does not exist here) is read."""
    from ldm.cli.sample import run
    with pytest.raises(ValueError, match="sampler 'heun' takes no option order"):
        run(config("sample", "prompt=a", "sampler=heun", "sampler_options.order=2", f"out_dir={tmp_path}"))
