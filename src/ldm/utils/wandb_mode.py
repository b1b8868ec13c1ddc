"""Choose the Weights & Biases mode before any logger is built, so a run never waits on the network."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from ldm.utils.logging import get_logger

log = get_logger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in rc.hosts)


def ensure_wandb_mode() -> str:
    """Respect WANDB_MODE when set; otherwise go offline when no API key is configured.

    Offline runs land in `<save_dir>/wandb/offline-run-*` and can be uploaded later with `wandb sync`.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if _has_api_key():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.info("No W&B API key found: logging offline (upload later with `wandb sync <run dir>`).")
    return "offline"
