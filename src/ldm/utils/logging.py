"""Rank-zero logging: one logger for the whole package, silent on every rank but the first."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities.rank_zero import rank_zero_only


def get_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls print only on global rank 0 (as in lightning-hydra-template)."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger
