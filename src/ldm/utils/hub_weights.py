"""Weights files fetched through torch hub (LPIPS' VGG16, the FID Inception): a local file, else torch hub's cache,
else a download; when no download can work (offline flags, or the host does not answer within seconds), an error at
start-up that names the config key taking a local file, instead of a hang or a failure deep in a run."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

OFFLINE_ENV = ("LDM_OFFLINE", "HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE")
PROBE_TIMEOUT_S = 2.0


class WeightsUnavailable(RuntimeError):
    """Weights that are neither a local file, nor cached, nor downloadable now; `keys` are the config keys that
    take a local file instead. `scripts/evaluate.py` collects these from every model it builds into one error."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class WeightsFileNotFound(WeightsUnavailable, FileNotFoundError):
    """A local weights file that a config key points at does not exist."""


def offline_flag() -> str | None:
    """The first of OFFLINE_ENV that is set (to anything but "" or "0"), else None."""
    return next((name for name in OFFLINE_ENV if os.environ.get(name, "") not in ("", "0")), None)


def hub_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection opens within `timeout` s (a thread: DNS lookups ignore socket timeouts)."""
    opened = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.set()
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return opened.is_set()


def torch_hub_file(url: str, path: str | None, *, key: str, what: str, needed: str, how_to_get: str,
                   local_name: str | None = None, probe_host: str | None = None,
                   timeout: float = PROBE_TIMEOUT_S) -> Path | None:
    """`path` (which must exist), else the file of `url` in torch hub's cache, else None when it can be downloaded.

    Args:
        key: the config key that takes a local file, named in every error.
        what / needed: "VGG16 weights" / "LPIPS needs ImageNet VGG16 weights", for the messages.
        how_to_get: how to get the file on a machine with internet, appended to every error.
        local_name: the file name suggested in `key=/path/to/<local_name>` (default: the url's).
        probe_host: the host probed before a download (default: the url's).
    """
    if path is not None:
        if not Path(path).is_file():
            raise WeightsFileNotFound(f"{what} not found at {path!r} (set by {key}). {how_to_get}", [key])
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    host = probe_host or url.split("/")[2]
    flag = offline_flag()
    if flag or not hub_reachable(host, 443, timeout=timeout):
        reason = f"{flag} is set" if flag else f"{host} is unreachable"
        raise WeightsUnavailable(f"{needed}, which are not cached at {cached} and cannot be downloaded ({reason}). "
                                 f"Set {key}=/path/to/{local_name or Path(url).name}. {how_to_get}", [key])
    return None
