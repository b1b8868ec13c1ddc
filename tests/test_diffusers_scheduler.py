"""Our process config -> diffusers scheduler: the scheduler's own sigmas must be the ladder our sampler uses, and what
diffusers cannot express must come back as a reason, not as a wrong scheduler."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from omegaconf import OmegaConf

from ldm.diffusion.schedules import CosineSchedule, LinearSchedule, ScaledLinearSchedule
from ldm.diffusion.spacing import discrete_sigmas
from ldm.interop.diffusers_scheduler import scheduler_for_process

S = "ldm.diffusion.schedules."
P = "ldm.diffusion.parameterization."


def process(schedule: dict, parameterization: str, shift: dict | None = None, with_schedule: bool = True) -> object:
    param = {"_target_": P + parameterization}
    if with_schedule:
        param["schedule"] = "${..schedule}"
    node = {"_target_": "ldm.diffusion.process.DiffusionProcess", "schedule": schedule, "parameterization": param,
            "shift": {"_target_": "ldm.diffusion.shift.TimestepShift", **(shift or {"shift": 1.0})}}
    return OmegaConf.create(node)


@pytest.mark.parametrize("name,schedule,ours,spacing,prediction", [
    ("ScaledLinearSchedule", {}, ScaledLinearSchedule(), "exponential", "v_prediction"),
    ("LinearSchedule", {"beta_start": 2e-4, "beta_end": 0.03}, LinearSchedule(beta_start=2e-4, beta_end=0.03),
     "exponential", "epsilon"),
    ("CosineSchedule", {}, CosineSchedule(), "trailing", "sample"),
], ids=["scaled_linear", "linear", "cosine"])
def test_ddpm_schedules_give_our_ladder(name: str, schedule: dict, ours: object, spacing: str,
                                        prediction: str) -> None:
    param = {"v_prediction": "VPrediction", "epsilon": "EpsPrediction", "sample": "X0Prediction"}[prediction]
    export = scheduler_for_process(process({"_target_": S + name, **schedule}, param))
    scheduler = export.scheduler
    assert isinstance(scheduler, UniPCMultistepScheduler) and export.reason is None
    assert scheduler.config.prediction_type == prediction and f"spacing={spacing}" in export.matches
    assert scheduler.config.solver_order == 3 and scheduler.config.solver_type == "bh2"
    for n in (10, 30):
        scheduler.set_timesteps(n)
        # diffusers computes its table in float32: the ladder's ends move by ~1e-5 relative (tests/test_samplers.py)
        torch.testing.assert_close(scheduler.sigmas.double(), discrete_sigmas(ours, n, spacing, dtype=torch.float64),
                                   rtol=3e-4, atol=1e-6)


@pytest.mark.parametrize("shift,expected", [
    ({"shift": 3.0}, {"shift": 3.0, "use_dynamic_shifting": False}),
    ({"shift": None, "base_shift": 0.5, "max_shift": 1.15, "base_seq_len": 256, "max_seq_len": 4096},
     {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
      "max_image_seq_len": 4096}),
], ids=["sd3", "flux"])
def test_rectified_flow_gets_flow_match_euler_with_the_shift(shift: dict, expected: dict) -> None:
    export = scheduler_for_process(process({"_target_": S + "RectifiedFlow"}, "FlowPrediction", shift,
                                           with_schedule=False))
    assert isinstance(export.scheduler, FlowMatchEulerDiscreteScheduler)
    assert {k: export.scheduler.config[k] for k in expected} == expected
    assert export.scheduler.config.num_train_timesteps == 1000 and "euler" in export.matches


@pytest.mark.parametrize("node,reason", [
    (process({"_target_": S + "KarrasSchedule"}, "EDMPrecond", with_schedule=False), "KarrasSchedule is continuous"),
    (process({"_target_": S + "ScaledLinearSchedule"}, "EDMPrecond", with_schedule=False),
     "parameterization EDMPrecond"),
    (process({"_target_": S + "ScaledLinearSchedule"}, "VPrediction", {"shift": 3.0}), "timestep shift"),
    (process({"_target_": S + "RectifiedFlow", "t_min": 0.1}, "FlowPrediction", with_schedule=False),
     r"t in \[0.1, 1.0\]"),
], ids=["karras", "edm_on_ddpm", "ddpm_shift", "flow_t_min"])
def test_what_diffusers_cannot_express_is_named(node: object, reason: str) -> None:
    export = scheduler_for_process(node)
    assert export.scheduler is None
    assert re.search(reason, export.reason), export.reason
