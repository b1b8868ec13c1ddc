"""Our diffusion process (schedule + parameterization + shift) -> the diffusers scheduler that samples it as our default
sampler does, or the reason none can.

DDPM schedules go to `UniPCMultistepScheduler` configured as our `unipc` sampler (UniPC-3, B(h) = e^h - 1, x0
prediction, exact last step to sigma 0) on the `exponential` ladder (uniform in log-SNR): that is our default sampler
(`sampler=auto` at >= 20 steps) and, whenever sigma_max <= steps / 2 (SD's scaled_linear: sigma_max = 14.6, so from 30
steps on), our default ladder `exponential_capped` too; tests/test_samplers.py holds the step-by-step parity. A
schedule whose sigma rises steeply at its end (cosine, zero terminal SNR) gets diffusers' "trailing" timesteps instead
(our `spacing=trailing`; `_runs_in_diffusers` says why).
Rectified flow goes to `FlowMatchEulerDiscreteScheduler`, SD3's and Flux's scheduler (our `euler`), with the shift.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.diffusion.schedules import DiscreteSchedule

# our schedule class -> diffusers' `beta_schedule` name, where diffusers computes the same betas (else trained_betas)
_BETA_SCHEDULES = {"ScaledLinearSchedule": "scaled_linear", "LinearSchedule": "linear"}
_PREDICTION_TYPES = {"EpsPrediction": "epsilon", "VPrediction": "v_prediction", "X0Prediction": "sample"}
# our `unipc` sampler as diffusers writes it (tests/test_samplers.py CASES["unipc"])
UNIPC_AS_OURS = dict(solver_order=3, solver_type="bh2", predict_x0=True, lower_order_final=True,
                     final_sigmas_type="zero", use_exponential_sigmas=True,
                     steps_offset=1)  # unused on this ladder; StableDiffusionPipeline rewrites any other value


@dataclass
class SchedulerExport:
    """The scheduler (None when diffusers has none for the process), which of our samplers it is, or why not."""

    scheduler: Any | None
    matches: str
    reason: str | None = None


def scheduler_for_process(process: Mapping[str, Any] | DictConfig) -> SchedulerExport:
    """A diffusers scheduler for a stage-2 `model.process` config (`_target_` nodes for schedule, parameterization,
    shift), or a `SchedulerExport` with `scheduler=None` and the reason when diffusers cannot express the process."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    schedule_cfg, param_cfg = _node(process, "schedule"), _node(process, "parameterization")
    shift_cfg = _node(process, "shift") if process.get("shift") is not None else {"shift": 1.0}
    schedule_name, param_name = _name(schedule_cfg), _name(param_cfg)
    shift = shift_cfg.get("shift", 1.0)
    if schedule_name == "RectifiedFlow":
        return _flow_scheduler(FlowMatchEulerDiscreteScheduler, schedule_cfg, param_cfg, shift_cfg)
    schedule = hydra.utils.instantiate(schedule_cfg)
    if not isinstance(schedule, DiscreteSchedule):
        return SchedulerExport(None, "", f"the schedule {schedule_name} is continuous; diffusers' DDPM schedulers take "
                                         "a table of betas and its flow schedulers rectified flow only")
    if param_name not in _PREDICTION_TYPES or param_cfg.get("schedule") is None:
        return SchedulerExport(None, "", f"the parameterization {param_name} (with schedule="
                                         f"{'set' if param_cfg.get('schedule') is not None else 'null'}) has no "
                                         "diffusers prediction_type; eps, v and x0 on the schedule's timesteps do")
    if shift != 1.0:
        return SchedulerExport(None, "", f"a timestep shift ({dict(shift_cfg)}) on a DDPM schedule has no diffusers "
                                         "counterpart")
    kwargs = _schedule_kwargs(schedule_cfg)
    zero_snr = bool(kwargs.get("zero_terminal_snr", False))
    betas: dict[str, Any]
    if schedule_name in _BETA_SCHEDULES:
        betas = dict(beta_schedule=_BETA_SCHEDULES[schedule_name], beta_start=float(kwargs["beta_start"]),
                     beta_end=float(kwargs["beta_end"]))
    elif schedule_name == "CosineSchedule" and kwargs.get("max_beta") == 0.999:
        betas = dict(beta_schedule="squaredcos_cap_v2")
    else:  # any other DDPM table: its betas before the zero-SNR rescale, which diffusers applies itself
        plain = hydra.utils.instantiate(schedule_cfg, **({"zero_terminal_snr": False} if zero_snr else {}))
        betas = dict(trained_betas=plain.betas.tolist())
    common = dict(num_train_timesteps=schedule.num_timesteps, prediction_type=_PREDICTION_TYPES[param_name],
                  rescale_betas_zero_snr=zero_snr, **betas)
    scheduler = UniPCMultistepScheduler(**common, **UNIPC_AS_OURS)
    matches = ("sampler=unipc spacing=exponential (= our default sampler=auto spacing=auto from 20 steps on while "
               "sigma_max <= steps / 2)")
    if not _runs_in_diffusers(scheduler):
        # diffusers' UniPC casts its timesteps to int64; where sigma rises steeply at the end of the table (cosine,
        # zero terminal SNR) exponential sigmas put the first two on t = 999 and its step index breaks
        # (AssertionError in `step`). "trailing" timesteps are distinct integers and reach the last (zero-SNR) step.
        scheduler = UniPCMultistepScheduler(**common, **{**UNIPC_AS_OURS, "use_exponential_sigmas": False,
                                                         "timestep_spacing": "trailing"})
        matches = "sampler=unipc spacing=trailing"
    _check_same_table(scheduler, schedule)
    return SchedulerExport(scheduler, matches)


def _runs_in_diffusers(scheduler: Any, steps: tuple[int, ...] = (10, 20, 25, 30, 40, 50, 75, 100)) -> bool:
    """Whether diffusers' own loop (set_timesteps, then step per timestep) gets through the ladder at the usual step
    counts: a dry run on a zero sample, since a repeated first timestep makes `step` start at index 1 and fail."""
    sample = torch.zeros(1, 1, 1, 1)
    for n in steps:
        scheduler.set_timesteps(n)
        try:
            for t in scheduler.timesteps:
                scheduler.step(torch.zeros_like(sample), t, sample)
        except (AssertionError, IndexError):
            return False
    return True


def _flow_scheduler(cls: type, schedule_cfg: Mapping[str, Any], param_cfg: Mapping[str, Any],
                    shift_cfg: Mapping[str, Any]) -> SchedulerExport:
    kwargs = _schedule_kwargs(schedule_cfg)
    if (kwargs.get("t_min", 0.0), kwargs.get("t_max", 1.0)) != (0.0, 1.0):
        return SchedulerExport(None, "", f"rectified flow on t in [{kwargs['t_min']}, {kwargs['t_max']}]: diffusers' "
                                         "flow schedulers span [0, 1]")
    scale = _schedule_kwargs(param_cfg).get("timestep_scale", 1000.0)
    if _name(param_cfg) != "FlowPrediction" or float(scale) != round(float(scale)):
        return SchedulerExport(None, "", f"rectified flow with {_name(param_cfg)} (timestep_scale={scale}): diffusers "
                                         "flow schedulers take a velocity on timesteps t * num_train_timesteps")
    shift = {k: v for k, v in _schedule_kwargs(shift_cfg).items()}
    if shift.get("shift") is None:  # Flux's resolution-dependent shift
        extra = dict(use_dynamic_shifting=True, base_shift=shift["base_shift"], max_shift=shift["max_shift"],
                     base_image_seq_len=shift["base_seq_len"], max_image_seq_len=shift["max_seq_len"])
    else:
        extra = dict(shift=float(shift["shift"]))
    return SchedulerExport(cls(num_train_timesteps=int(scale), **extra), "sampler=euler (diffusers' own t ladder)")


def _check_same_table(scheduler: Any, schedule: DiscreteSchedule) -> None:
    """The exported scheduler's alpha_bar against ours (diffusers keeps float32 and puts 2^-24 at a zero terminal
    SNR): a guard against a mapping that names the wrong betas."""
    theirs, ours = scheduler.alphas_cumprod.double()[:-1], schedule.alphas_cumprod[:-1]
    if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise RuntimeError(f"internal: the exported scheduler's alphas_cumprod differ from the schedule's by "
                           f"{(theirs - ours).abs().max().item():.3g}")


def _node(process: Mapping[str, Any], key: str) -> Any:
    node = process[key]
    return node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))


def _name(node: Mapping[str, Any]) -> str:
    return str(node["_target_"]).rsplit(".", 1)[-1]


def _schedule_kwargs(node: Mapping[str, Any]) -> dict[str, Any]:
    """A config node's constructor arguments with the class's defaults filled in (plain values only)."""
    cls = hydra.utils.get_class(node["_target_"]) if "_target_" in node else None
    defaults = {} if cls is None else {k: p.default for k, p in inspect.signature(cls).parameters.items()
                                       if p.default is not inspect.Parameter.empty}
    given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {**defaults, **{k: v for k, v in given.items() if k != "_target_" and not isinstance(v, dict)}}
