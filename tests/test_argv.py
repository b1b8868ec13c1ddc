"""One command-line convention: free-text prompts reach sample.py's config verbatim, and the argparse scripts
(export_pipeline, export_autoencoder, sweep_report) take `key=value` as well as `--key value`."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from ldm.cli.sample import TEXT_KEYS
from ldm.cli.sweep_report import build_parser as sweep_report_parser
from ldm.utils.argv import hydra_quote, key_value_args, parse_args, quote_text_overrides

TRICKY = [
    "a small red circle in the top left corner, on a blue background",
    "it's a \"quoted\" word, isn't it",
    "a=b, c=d == e",
    "[sic] a cat on a mat",
    "a cat [2]",
    "ünïcødé ☃ 猫, 🐱",
    "back\\slash\\",
    "\\'",
    "\\\\'x'\\",
    "",
    "  leading and trailing spaces  ",
    "two\nlines",
    "50% off; #1 $5 ~tilde +plus",
    "'",
    '"',
    "a,b",
    "[a, b",
    "42",
    "true",
]
INTERPOLATION_LIKE = ["${oc.env:HOME}", "\\${x}", "a \\\\${b} c"]


def _parsed(arg: str) -> object:
    return OverridesParser.create().parse_override(arg).value()


@pytest.mark.parametrize("text", TRICKY)
def test_hydra_parses_a_quoted_prompt_back_to_the_text(text: str) -> None:
    [arg] = quote_text_overrides([f"prompt={text}"], TEXT_KEYS)
    assert _parsed(arg) == text
    assert _parsed(f"negative_prompt={hydra_quote(text)}") == text


def test_the_composed_config_holds_the_text_verbatim() -> None:
    """Through Hydra and OmegaConf, including text that looks like an interpolation."""
    texts = TRICKY[:8] + INTERPOLATION_LIKE
    for text in texts:
        overrides = quote_text_overrides(["ckpt=x", f"prompt={text}", f"negative_prompt={text}"], TEXT_KEYS)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("sample", overrides=overrides)
        assert (cfg.prompt, cfg.negative_prompt) == (text, text)


@pytest.mark.parametrize(("arg", "value"), [
    ("prompt=[a red circle,a blue star]", ["a red circle", "a blue star"]),
    ('prompt=["a red circle, on blue","a star"]', ["a red circle, on blue", "a star"]),
    ("prompt=[]", []),
    ("prompt='already, quoted'", "already, quoted"),
    ('prompt="already, quoted"', "already, quoted"),
    ("prompt=null", None),
    ("+prompt=a, b", "a, b"),
])
def test_lists_quoted_values_and_null_keep_their_hydra_meaning(arg: str, value: object) -> None:
    [rewritten] = quote_text_overrides([arg], TEXT_KEYS)
    assert _parsed(rewritten) == value


def test_only_the_text_keys_are_rewritten() -> None:
    argv = ["ckpt=a,b", "steps=4", "-m", "prompt_file=x, y", "--config-name", "sample", "prompt=a, b"]
    assert quote_text_overrides(argv, TEXT_KEYS) == [*argv[:-1], "prompt='a, b'"]


# ------------------------------------------------------------------ argparse scripts: key=value


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--evaluation", action="append", default=[])
    parser.add_argument("--out", default=None)
    return parser


def test_key_value_items_become_options() -> None:
    parser = _demo_parser()
    argv = ["runs/a=b", "batch_size=8", "raw=true", "evaluation=x.json", "evaluation=y.json", "out=-dash=y"]
    assert key_value_args(parser, argv) == ["runs/a=b", "--batch-size=8", "--raw", "--evaluation=x.json",
                                             "--evaluation=y.json", "--out=-dash=y"]
    args = parse_args(parser, argv)
    assert (args.dir, args.batch_size, args.raw, args.evaluation, args.out) == \
        ("runs/a=b", 8, True, ["x.json", "y.json"], "-dash=y")


def test_both_spellings_mix_and_positionals_keep_working() -> None:
    parser = _demo_parser()
    a = parse_args(parser, ["--batch-size", "4", "dir=runs", "batch-size=8", "raw=false"])
    b = parse_args(parser, ["runs", "--batch-size=8"])
    assert vars(a) == vars(b)
    assert key_value_args(parser, ["x", "--", "raw=true"]) == ["x", "--", "raw=true"]


@pytest.mark.parametrize(("argv", "message"), [
    (["x", "raw=maybe"], "raw= is a flag: it takes true or false"),
    (["x", "bogus=1"], "unrecognized arguments: bogus=1"),
])
def test_bad_key_value_items_are_clear_errors(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(_demo_parser(), argv)
    assert message in capsys.readouterr().err


def _script_parser(name: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_export_pipeline_takes_both_styles() -> None:
    parser = _script_parser("export_pipeline")
    flags = parse_args(parser, ["--ckpt", "run/last.ckpt", "--out", "exp", "--raw", "--autoencoder", "ae"])
    pairs = parse_args(parser, ["ckpt=run/last.ckpt", "out=exp", "raw=true", "autoencoder=ae"])
    assert vars(flags) == vars(pairs) and pairs.out == Path("exp") and pairs.raw
    assert "key=value" in parser.format_help()


def test_export_autoencoder_takes_both_styles() -> None:
    parser = _script_parser("export_autoencoder")
    flags = parse_args(parser, ["--ckpt", "c", "--shards", "s/{0..3}.tar", "--resolution", "256", "--batch-size",
                                "32", "--num-batches", "5", "--mode", "mean", "--device", "cpu"])
    pairs = parse_args(parser, ["ckpt=c", "shards=s/{0..3}.tar", "resolution=256", "batch_size=32",
                                "num-batches=5", "mode=mean", "device=cpu"])
    assert vars(flags) == vars(pairs) and pairs.batch_size == 32 and pairs.num_batches == 5
    assert "key=value" in parser.format_help()


def test_sweep_report_takes_both_styles() -> None:
    parser = sweep_report_parser()
    flags = parse_args(parser, ["outputs/m", "--metrics", "val/loss,eval/fid*", "--sort", "val/loss",
                                "--descending", "--format", "csv", "--evaluation", "a.json"])
    pairs = parse_args(parser, ["dir=outputs/m", "metrics=val/loss,eval/fid*", "sort=val/loss", "descending=true",
                                "format=csv", "evaluation=a.json"])
    positional = parse_args(parser, ["outputs/m", "metrics=val/loss,eval/fid*", "sort=val/loss", "descending=yes",
                                     "format=csv", "evaluation=a.json"])
    assert vars(flags) == vars(pairs) == vars(positional) and pairs.metrics == ["val/loss", "eval/fid*"]
    assert "key=value" in parser.format_help()
