"""Samplers by name: a registry of diffusers scheduler classes plus the settings that make them behave
like the A1111 sampler of the same name, all built on the standard SD noise schedule.

The registry holds class *names* (resolved on first use), so validating a payload file does not import
diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from automerge.registry import Registry

PREDICTION_TYPES = ("epsilon", "v_prediction")

# The noise schedule every SD1/SD2/SDXL checkpoint was trained with (CompVis / Stability configs):
# betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2. `steps_offset: 1` and `clip_sample: False`
# are what diffusers' pipelines otherwise patch into outdated configs with a deprecation warning.
SD_NOISE_SCHEDULE: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
)


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class (by name) and the keyword arguments that select the variant."""

    class_name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    ancestral: bool = False  # draws fresh noise every step from the per-image generator


SCHEDULERS: Registry[SchedulerSpec] = Registry("scheduler")

# k-diffusion samplers in A1111 space the timesteps evenly from 999 to 0 ("linspace"); A1111's DDIM
# uses "leading" spacing (0, 1000/n, …) + steps_offset 1. Mapping from the diffusers scheduler docs.
_KDIFF = {"timestep_spacing": "linspace"}
SCHEDULERS.register("euler", SchedulerSpec("EulerDiscreteScheduler", _KDIFF))
SCHEDULERS.register("euler_a", SchedulerSpec("EulerAncestralDiscreteScheduler", _KDIFF, ancestral=True))
SCHEDULERS.register("heun", SchedulerSpec("HeunDiscreteScheduler", _KDIFF))
SCHEDULERS.register(
    "dpmpp_2m",
    SchedulerSpec(
        "DPMSolverMultistepScheduler", {**_KDIFF, "algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
)
SCHEDULERS.register(
    "dpmpp_2m_karras",
    SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {**_KDIFF, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
)
SCHEDULERS.register("unipc", SchedulerSpec("UniPCMultistepScheduler", _KDIFF))
SCHEDULERS.register(
    "ddim",
    SchedulerSpec(
        "DDIMScheduler", {"timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False}
    ),
)


def scheduler_config(name: str, *, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The full constructor config of scheduler ``name``: SD noise schedule + variant + prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    spec = SCHEDULERS.get(name)
    return {**SD_NOISE_SCHEDULE, **spec.kwargs, "prediction_type": prediction_type}


def make_scheduler(name: str, *, prediction_type: str = "epsilon") -> Any:
    """A fresh diffusers scheduler for sampler ``name`` (``ConfigError`` with "did you mean" if unknown)."""
    import diffusers  # deferred: payload validation uses this module without diffusers

    spec = SCHEDULERS.get(name)
    scheduler_class = getattr(diffusers, spec.class_name)
    return scheduler_class(**scheduler_config(name, prediction_type=prediction_type))
