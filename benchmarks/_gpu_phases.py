"""gpu_study's phases and settings, and the files of a phase: sources a and b (tiny, or real-size
random from ``_sources``), the reward models (tiny, or ImageReward and LAION-aesthetic at their
published sizes with random weights, from ``automerge.testing``) with their composite manifest, and a
fresh payload and study file."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _sources import real_sources

from automerge.dtypes import TORCH_DTYPES
from automerge.files import write_text_atomic
from automerge.study import StudyFile, load_study_file
from automerge.testing import (
    write_random_imagereward,
    write_random_laion_aesthetic,
    write_tiny_imagereward,
    write_tiny_laion_aesthetic,
)
from automerge.tiny import write_tiny

PROMPTS = (
    "a lighthouse on a cliff at dusk, crashing waves, oil painting",
    "close-up portrait photo of an old fisherman with a grey beard, overcast harbour light",
    "a bowl of red apples on a wooden table, soft window light, still life",
    "misty pine forest at sunrise, god rays through the trees, photograph",
    "a frozen waterfall under the northern lights, starry sky, long exposure",
    "studio portrait of a young woman with freckles and curly red hair, rim light",
    "medieval hill town above a sea of fog at dawn, ukiyo-e woodblock print",
    "a jazz saxophonist on a smoky stage, blue and amber spotlights",
)
SEEDS = {"a": 1, "b": 2}  # of the sources


@dataclass(frozen=True)
class Phase:
    """One study configuration: family, real or tiny weights, image size, offload (low-VRAM) mode."""

    name: str
    family: str
    tiny: bool
    size: int  # pixels, square
    offload: bool


PHASES = {
    p.name: p
    for p in (
        Phase("sd1", "sd1", tiny=False, size=512, offload=False),
        Phase("sdxl", "sdxl", tiny=False, size=1024, offload=False),
        Phase("sdxl-lowvram", "sdxl", tiny=False, size=1024, offload=True),
        Phase("tiny-sd1", "sd1", tiny=True, size=64, offload=False),
        Phase("tiny-sdxl-lowvram", "sdxl", tiny=True, size=64, offload=True),
    )
}


@dataclass(frozen=True)
class Settings:
    device: str
    phases: tuple[str, ...]
    trials: int
    images: int
    steps: int
    batch_size: int
    dtype: str  # live and render dtype: fp16 on a GPU, fp32 on the CPU
    reps: int
    std: float
    vram_cap_gib: float
    workdir: Path
    out: Path
    threads: int | None  # torch intra-op threads (None: torch's default)


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    write_text_atomic(path, yaml.safe_dump(dict(data), sort_keys=False))
    return path


def make_sources(phase: Phase, settings: Settings, folder: Path) -> dict[str, Path]:
    """Models a and b of ``phase`` (tiny: ``write_tiny`` seeds 1, 2; real: random, seeds 1, 2)."""
    if not phase.tiny:
        return real_sources(phase.family, folder, SEEDS, std=settings.std, device=settings.device)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        letter: write_tiny(phase.family, folder / f"tiny-{phase.family}-{letter}.safetensors", seed=seed)
        for letter, seed in SEEDS.items()
    }


def make_rewards(settings: Settings, folder: Path, *, tiny: bool) -> Path:
    """ImageReward and LAION-aesthetic manifests (tiny or real size) and their composite (reused)."""
    composite = folder / "composite.yaml"
    if composite.is_file():  # written last: the members are complete
        print(f"  reusing {folder.name}")
        return composite
    started = time.perf_counter()
    if tiny:
        members = [
            write_tiny_imagereward(folder / "imagereward"),
            write_tiny_laion_aesthetic(folder / "laion"),
        ]
    else:
        options: dict[str, Any] = {"device": settings.device, "dtype": TORCH_DTYPES[settings.dtype]}
        members = [
            write_random_imagereward(folder / "imagereward", **options),
            write_random_laion_aesthetic(folder / "laion", **options),
        ]
    for manifest in members:
        data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        write_yaml(manifest, {**data, "device": settings.device, "dtype": settings.dtype, "batch_size": 8})
    print(f"  wrote {folder.name} reward models ({time.perf_counter() - started:.1f} s)")
    return write_yaml(
        composite,
        {
            "reward": "composite",
            "name": "imagereward+laion-aesthetic",
            "members": [{"manifest": str(m.relative_to(folder)), "weight": 1.0} for m in members],
        },
    )


def make_study(
    phase: Phase, settings: Settings, folder: Path, *, sources: Mapping[str, Path], reward: Path
) -> StudyFile:
    """A fresh study (old storage and artifacts removed): payload, study file, loaded and checked."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in (folder / "study.db", folder / "study-artifacts"):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seeds": [i + 1]} for i in range(settings.images)]
    defaults = {
        "steps": settings.steps,
        "cfg": 6.0,
        "width": phase.size,
        "height": phase.size,
        "scheduler": "euler" if phase.tiny else "dpmpp_2m_karras",
        "negative_prompt": "lowres, blurry, watermark",
    }
    payload = write_yaml(folder / "payload.yaml", {"defaults": defaults, "items": items})
    study = {
        "name": f"gpu-{phase.name}",
        "models": {name: str(path) for name, path in sources.items()},
        "method": "weighted_sum",
        "search": {"alpha": {"blocks": "all", "low": 0.0, "high": 1.0}},
        "payloads": [str(payload)],
        "reward": str(reward),
        "sampler": {"name": "gp", "seed": 0, "startup_trials": min(4, settings.trials)},
        "trials": settings.trials,
        "early_stopping": None,
        "baselines": True,
        "render": {
            "device": settings.device,
            "dtype": settings.dtype,
            "batch_size": settings.batch_size,
            "offload": phase.offload,
        },
        "export": {"dir": str(folder / "export"), "dtype": "fp16"},
    }
    return load_study_file(write_yaml(folder / "study.yaml", study))
