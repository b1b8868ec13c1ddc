"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3):
power-function EMA profiles tracked during training, their snapshots, and the least-squares reconstruction of the
EMA of any length sigma_rel from them after training.

A power-function EMA with exponent gamma averages the weights of steps 1..t with the density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (EDM2 Eq. 2); its relative standard deviation is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 3). Updated once per step with
beta_t = (1 - 1/t)^(gamma + 1), the weight of step tau in the average at t is exactly the integral of p over
(tau - 1, tau], so the continuous inner products below are exact for the discrete averages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

SNAPSHOT_GLOB = "*.safetensors"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative length sigma_rel (EDM2 Eq. 3, the cubic's real root)."""
    if not 0 < sigma_rel < 1 / math.sqrt(12):  # gamma -> -1 gives sigma_rel -> 0; gamma = 0 gives 1/sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {1 / math.sqrt(12):.4f}) (gamma >= 0), got {sigma_rel}")
    t = sigma_rel ** -2  # (gamma + 2)^2 (gamma + 3) = t (gamma + 1)
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 3."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def ema_beta(step: int, gamma: float) -> float:
    """The decay of the power-function EMA's update at step t >= 1 (EDM2 Eq. 2): avg = beta avg + (1 - beta) theta."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


def profile_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = int p_a p_b of power-function profiles ending at t_a and t_b, elementwise (broadcast), in logs."""
    g = gamma_a + gamma_b + 1
    log = (np.log(gamma_a + 1) + np.log(gamma_b + 1) + g * np.log(np.minimum(t_a, t_b)) - np.log(g)
           - (gamma_a + 1) * np.log(t_a) - (gamma_b + 1) * np.log(t_b))
    return np.exp(log)


def _normal_equations(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                      target_gamma: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The Gram matrix <p_i, p_j>, the right side <p_i, p_target> and <p_target, p_target>, in times / target_step
    (the least squares are scale-free)."""
    t, g = np.asarray(steps, np.float64) / target_step, np.asarray(gammas, np.float64)
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, np.ones_like(t), np.full_like(g, target_gamma))
    one, gt = np.ones(1), np.full(1, target_gamma)
    return a, b, float(profile_inner(one, gt, one, gt)[0])


def posthoc_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                         target_gamma: float) -> np.ndarray:
    """x minimizing || sum_i x_i p_i - p_target ||_2 over [0, target_step] (EDM2 App. C.2): the weights of the
    snapshots (step_i, gamma_i) whose combination best matches the target profile."""
    a, b, _ = _normal_equations(steps, gammas, target_step, target_gamma)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def profile_error(steps: Sequence[float], gammas: Sequence[float], coefficients: np.ndarray, target_step: float,
                  target_gamma: float) -> float:
    """|| sum_i x_i p_i - p_target || / || p_target ||: how well the snapshots express the target profile."""
    a, b, norm = _normal_equations(steps, gammas, target_step, target_gamma)
    x = coefficients
    return float(math.sqrt(max(x @ a @ x - 2 * x @ b + norm, 0.0) / norm))


# ------------------------------------------------------------------------------------------------ snapshots
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: every tracked profile's average at `step`."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]
    buffers: tuple[str, ...]  # entries that are not averaged (they follow the live model)

    @property
    def gammas(self) -> tuple[float, ...]:
        return tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)


def snapshot_name(step: int) -> str:
    return f"{step:09d}.safetensors"


def save_snapshot(path: Path, step: int, averages: Sequence[Mapping[str, Tensor]], sigma_rels: Sequence[float],
                  buffers: Sequence[str]) -> None:
    """Write the averages (one state dict per profile) as `<profile>/<name>`, atomically (a kill mid-write leaves no
    partial file). `buffers` (entries that are not averaged: buffers, frozen parameters) are the same in every
    profile and are written once, under profile 0, where `reconstruct` reads them."""
    skip = set(buffers)
    tensors = {f"{i}/{k}": v.detach().cpu().contiguous() for i, avg in enumerate(averages) for k, v in avg.items()
               if i == 0 or k not in skip}
    meta = {"step": str(step), "sigma_rels": json.dumps(list(sigma_rels)), "buffers": json.dumps(list(buffers))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in `folder`, by step (metadata only: no tensor is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No post-hoc EMA snapshots at {folder}: train with +callbacks=posthoc_ema (the run "
                                "writes them to <run>/posthoc_ema).")
    snapshots = []
    for path in sorted(folder.glob(SNAPSHOT_GLOB)):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "step" not in meta:
            raise ValueError(f"{path} is not a post-hoc EMA snapshot (no step in its metadata)")
        snapshots.append(Snapshot(path, int(meta["step"]), tuple(json.loads(meta["sigma_rels"])),
                                  tuple(json.loads(meta["buffers"]))))
    if not snapshots:
        raise FileNotFoundError(f"{folder} holds no snapshot ({SNAPSHOT_GLOB})")
    return sorted(snapshots, key=lambda s: s.step)


@dataclass(frozen=True)
class Reconstruction:
    """An EMA rebuilt post hoc: the state dict and how well the snapshots matched the target profile."""

    state_dict: dict[str, Tensor]
    sigma_rel: float
    step: int
    profile_error: float
    num_snapshots: int


def reconstruct(folder: str | Path, sigma_rel: float, step: int | None = None,
                sources: Sequence[float] | None = None) -> Reconstruction:
    """The EMA of length `sigma_rel` at `step` (default: the last snapshot's) from the snapshots up to that step.

    Args:
        sources: the tracked sigma_rels to combine (default: all); the others are left out.
    """
    snapshots = list_snapshots(folder)
    step = snapshots[-1].step if step is None else step
    used = [s for s in snapshots if s.step <= step]
    if not used or used[-1].step != step:
        raise ValueError(f"no snapshot at step {step} in {folder}; steps with one: {[s.step for s in snapshots]}")
    terms = [(snap, i) for snap in used for i, s in enumerate(snap.sigma_rels)
             if sources is None or any(math.isclose(s, want) for want in sources)]
    if not terms:
        raise ValueError(f"none of sources={list(sources or [])} is tracked; the snapshots hold {used[-1].sigma_rels}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    steps, gammas = [snap.step for snap, _ in terms], [snap.gammas[i] for snap, i in terms]
    x = posthoc_coefficients(steps, gammas, step, gamma)
    total: dict[str, Tensor] = {}
    state: dict[str, Tensor] = {}
    for snap in used:  # one file at a time: memory of two state dicts, not of every snapshot
        state = load_file(str(snap.path))
        for (s, i), coefficient in zip(terms, x):
            if s is not snap:
                continue
            for key, value in state.items():
                profile, name = key.split("/", 1)
                if int(profile) != i or name in snap.buffers or not value.is_floating_point():
                    continue
                total[name] = total.get(name, 0) + coefficient * value.double()
    result = {}
    for key, value in state.items():  # the latest snapshot's entries, in its dtype; buffers as they were last
        profile, name = key.split("/", 1)
        if int(profile) == 0:
            result[name] = total[name].to(value.dtype) if name in total else value
    return Reconstruction(result, sigma_rel, step, profile_error(steps, gammas, x, step, gamma), len(used))
