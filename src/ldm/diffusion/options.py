"""Keyword options of the plain functions this package registers (samplers, guidance rules), checked against their
signatures before a run, so that a wrong option is a start-up error naming the valid ones, not a TypeError mid-run."""

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def check_options(fn: Callable[..., Any], options: Mapping[str, Any], what: str, skip: Sequence[str] = ()) -> None:
    """Keyword options that `fn` does not take are a ValueError naming the ones it does (not a TypeError mid-run)."""
    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in skip
                and p.default is not inspect.Parameter.empty]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{what} takes no option {', '.join(unknown)}; its options are {accepted or 'none'}")
