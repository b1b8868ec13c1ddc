"""One command-line convention for every ldm command: `key=value`. Hydra's commands get free text quoted for its
override grammar; the argparse scripts get `key=value` turned into their `--key=value` options."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence

KEY_VALUE_EPILOG = ("Every option also takes the key=value form of the Hydra commands (sample.py, evaluate.py,\n"
                    "train.py): {example}\n'-' and '_' are alike in keys; switches take true/false.")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# ------------------------------------------------------------------ Hydra: free-text values


def hydra_quote(text: str) -> str:
    """`text` as a single-quoted Hydra override value that Hydra and OmegaConf read back verbatim."""
    # OmegaConf: `${` starts an interpolation unless escaped as `\${`; backslashes right before it are doubled.
    text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)
    # Hydra's quoted strings: a quote is escaped as \' and backslashes before a quote (or the closing one) doubled.
    text = re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text)
    return f"'{text}'"


def quote_text_overrides(argv: Sequence[str], keys: Iterable[str]) -> list[str]:
    """Quote the values of `key=free text` overrides so commas, quotes, `=`, brackets and unicode arrive verbatim.

    The shell has already removed the user's quotes from `prompt="a circle, on blue"`, and Hydra's grammar then
    reads the comma as a sweep ("Ambiguous value"). Kept as they are: values that are already one quoted Hydra
    string, `[...]` lists that Hydra parses (`prompt=[a,b]`, `prompt='["a, b","c"]'`) and `null`.
    """
    pattern = re.compile(rf"(\+{{0,2}}(?:{'|'.join(map(re.escape, keys))}))=(.*)", re.DOTALL)
    return [f"{m[1]}={hydra_quote(m[2])}" if (m := pattern.fullmatch(arg)) and not _keep(arg, m[2]) else arg
            for arg in argv]


def _keep(arg: str, value: str) -> bool:
    if value == "null":
        return True
    if value[:1] not in ("'", '"', "["):
        return False
    # Imported here: the argparse scripts use this module without Hydra.
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(arg)
    except HydraException:
        return False
    return override.value_type == ValueType.ELEMENT and isinstance(override.value(), str | list)


# ------------------------------------------------------------------ argparse: key=value options


def key_value_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`key=value` items -> `--key=value` for the parser's own options (`-`/`_` alike; a flag takes true/false),
    `dest=value` -> `value` for a positional; anything else, and all after `--`, is left as it is."""
    options = {s.lstrip("-").replace("-", "_"): a for a in parser._actions for s in a.option_strings
               if s.startswith("--")}
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        m = re.fullmatch(r"([A-Za-z][\w-]*)=(.*)", arg, re.DOTALL)
        key = m[1].replace("-", "_") if m else None
        if key in options:
            out += _option(parser, options[key], m[1], m[2])
        elif key in positionals:
            out.append(m[2])
        else:
            out.append(arg)
    return out


def _option(parser: argparse.ArgumentParser, action: argparse.Action, key: str, value: str) -> list[str]:
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs != 0:
        return [f"{flag}={value}"]
    if value.lower() not in _TRUE + _FALSE:
        parser.error(f"{key}= is a flag: it takes true or false, got {value!r}")
    wanted = value.lower() in _TRUE
    if action.const == wanted:  # store_true given true, store_false given false
        return [flag]
    if action.default == wanted:
        return []
    parser.error(f"{key}={value} cannot be expressed with {flag}")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args` that also takes `key=value` for every option (argv: default sys.argv[1:])."""
    return parser.parse_args(key_value_args(parser, sys.argv[1:] if argv is None else argv))
