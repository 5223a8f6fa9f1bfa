"""Everything a study keeps resident: the live engine (sources on the device), the pipeline around
its modules, the payload jobs, the reward. Built once per run; trials only call ``evaluate``."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from automerge.checkpoints import warm_hash_cache
from automerge.errors import ConfigError, StudyError
from automerge.merge.engine import EngineOptions, LiveEngine
from automerge.merge.params import BlockParams, resolve_params
from automerge.merge.recipe import MergePlan, plan_merge, recipe_from_data
from automerge.render.payload import RenderJob, load_payload
from automerge.study.config import InlineReward, StudyFile, as_plain
from automerge.study.space import SearchSpace, build_space


@dataclass(frozen=True)
class StudyJob:
    """A render job within the study: its payload and a study-wide unique key (``p0-i03-s0002``)."""

    payload: int
    job: RenderJob

    @property
    def key(self) -> str:
        return f"p{self.payload}-{self.job.key}"


@dataclass
class Evaluation:
    """One evaluated parameter set: the trial value and everything the report and dashboard show."""

    value: float
    payload_scores: list[float]
    reward_scores: dict[str, float]  # mean raw score per reward component
    images: dict[str, Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    raw: dict[str, list[float]] = field(default_factory=dict)


def generate_models(study: StudyFile) -> None:
    """Write the study's ``generate:`` tiny models that do not exist yet (``like`` ones after their base)."""
    from automerge.testing.tiny import write_tiny

    pending = dict(study.generate)
    while pending:
        for name, spec in list(pending.items()):
            if spec.like is not None and spec.like in pending:
                continue
            path = study.models[name]
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                like = study.models[spec.like] if spec.like else None
                write_tiny(spec.tiny, path, seed=spec.seed, like=like, delta=spec.delta)
            del pending[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"render.device is '{name}' but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


class StudyRuntime:
    """The resident state of a running study."""

    def __init__(self, study: StudyFile, *, device: str | None = None) -> None:
        # 1. Sources (headers only), search space and payloads: every check before any tensor loads.
        generate_models(study)
        self.study = study
        self.plan: MergePlan = plan_merge(study_recipe(study, study.params), source=str(study.path))
        self.space: SearchSpace = build_space(study, self.plan.arch, self.plan.method)
        self.jobs = [
            StudyJob(i, job) for i, path in enumerate(study.payloads) for job in load_payload(path).jobs()
        ]
        self.validation_jobs = [
            StudyJob(i, job)
            for i, path in enumerate(study.validation_payloads)
            for job in load_payload(path).jobs()
        ]
        # 2. The live engine and the pipeline around its modules.
        self.device = resolve_device(device or study.render.device)
        self.dtype = resolve_dtype(study.render.dtype, self.device)
        source_dtype = (
            None
            if study.render.source_dtype == "same"
            else resolve_dtype(study.render.source_dtype, self.device)
        )
        # The export's metadata names each source's sha256: hash them while the study runs.
        warm_hash_cache(dict.fromkeys(m.path for m in self.plan.sources.values() if m.path.is_file()))
        self.engine = LiveEngine(
            self.plan,
            EngineOptions(
                device=str(self.device),
                dtype=self.dtype,
                source_dtype=source_dtype,
                offload=study.render.offload,
            ),
        )
        self.renderer = self._renderer(self.engine)
        # 3. The reward (a reference target is rendered once, here).
        self.reward = self._reward()

    def params_for(self, values: Mapping[str, float]) -> BlockParams:
        raw = self.space.raw_params(values)
        return resolve_params(
            self.plan.method, raw, blocks=self.plan.arch.blocks, source=str(self.study.path)
        )

    def _renderer(self, engine: LiveEngine):  # noqa: ANN202 - diffusers types stay inside render/
        from automerge.render.pipeline import build_pipeline, pipeline_modules
        from automerge.render.renderer import Renderer

        modules = engine.modules
        live = pipeline_modules(
            modules, family=self.plan.arch.name, prediction_type=self.plan.arch.prediction_type
        )
        pipeline = build_pipeline(
            live,
            tokenizer_dir=self.study.render.tokenizer_dir,
            device=self.device,
            dtype=self.dtype,
            compile_unet=self.study.render.compile,
        )
        return Renderer(
            pipeline, batch_size=self.study.render.batch_size, device=self.device, dtype=self.dtype
        )

    def _reward(self):  # noqa: ANN202
        from automerge.rewards import ReferenceReward, Reward, load_reward

        reward = self.study.reward
        if isinstance(reward, Path):
            return load_reward(reward, device=str(self.device))
        assert isinstance(reward, InlineReward)
        reference = reward.reference
        if reference.folder is not None:
            model = ReferenceReward(metric=reference.metric, directory=reference.folder)
        elif reference.target is not None:
            params = resolve_params(
                self.plan.method,
                reference.target.params,
                blocks=self.plan.arch.blocks,
                source=str(self.study.path),
            )
            model = ReferenceReward.from_images(
                self.render_images(params, self.jobs), metric=reference.metric
            )
        else:
            assert reference.checkpoint is not None
            model = ReferenceReward.from_images(
                self._render_checkpoint(reference.checkpoint), metric=reference.metric
            )
        return Reward(model)

    def _render_checkpoint(self, checkpoint: Path) -> dict[str, Image.Image]:
        """Reference images rendered once from another checkpoint, with its own short-lived engine."""
        data = {
            "models": {"a": str(checkpoint), "b": str(checkpoint)},
            "method": "weighted_sum",
            "params": {"alpha": 0.0},
        }
        plan = plan_merge(recipe_from_data(data, source=str(checkpoint)), source=str(checkpoint))
        try:
            if plan.arch.name != self.plan.arch.name:
                raise StudyError(
                    f"{self.study.path}: reward.reference.checkpoint {checkpoint} is {plan.arch.name}, "
                    f"the study's models are {self.plan.arch.name}"
                )
            engine = LiveEngine(plan, EngineOptions(device=str(self.device), dtype=self.dtype))
            engine.apply(plan.params)
            rendered = self._renderer(engine).render([job.job for job in self.jobs])
            return {job.key: image.image for job, image in zip(self.jobs, rendered, strict=True)}
        finally:
            plan.close()

    # -- trials ------------------------------------------------------------------------------------

    def render_images(self, params: BlockParams, jobs: Sequence[StudyJob]) -> dict[str, Image.Image]:
        self.engine.apply(params)
        rendered = self.renderer.render([job.job for job in jobs])
        return {job.key: image.image for job, image in zip(jobs, rendered, strict=True)}

    def evaluate(self, params: BlockParams, jobs: Sequence[StudyJob], *, report=None) -> Evaluation:  # noqa: ANN001
        """Merge in place, render and score ``jobs`` payload by payload; ``report(step, value)`` after
        each payload may raise to prune. Value = Σ weight·score / Σ weight over every image."""
        timings = {"merge": 0.0, "render": 0.0, "score": 0.0}
        started = time.perf_counter()
        self.engine.apply(params)
        timings["merge"] = time.perf_counter() - started
        images: dict[str, Image.Image] = {}
        weighted, total_weight, payload_scores = 0.0, 0.0, []
        raw: dict[str, list[float]] = {}
        for payload in sorted({job.payload for job in jobs}):
            group = [job for job in jobs if job.payload == payload]
            started = time.perf_counter()
            rendered = self.renderer.render([job.job for job in group])
            timings["render"] += time.perf_counter() - started
            started = time.perf_counter()
            result = self.reward.score(
                [r.image for r in rendered],
                [job.job.prompt for job in group],
                keys=[job.key for job in group],
            )
            timings["score"] += time.perf_counter() - started
            for component in result.components:
                raw.setdefault(component.name, []).extend(component.raw)
            weights = [job.job.weight for job in group]
            payload_value = sum(w * s for w, s in zip(weights, result.scores, strict=True)) / sum(weights)
            payload_scores.append(payload_value)
            weighted += payload_value * sum(weights)
            total_weight += sum(weights)
            images.update({job.key: r.image for job, r in zip(group, rendered, strict=True)})
            if report is not None:
                report(len(payload_scores) - 1, weighted / total_weight)
        value = weighted / total_weight
        if not math.isfinite(value):
            raise StudyError(f"the trial score is {value} (a reward returned a non-finite value)")
        reward_scores = {name: sum(values) / len(values) for name, values in raw.items()}
        return Evaluation(value, payload_scores, reward_scores, images, timings, raw)

    def close(self) -> None:
        self.plan.close()


def study_recipe(study: StudyFile, params: Mapping) -> object:
    """A merge recipe of the study's models and method with ``params`` (a full per-block map)."""
    data = {
        "models": {name: str(path) for name, path in study.models.items()},
        "method": study.method,
        "params": as_plain(dict(params)),
        "seed": study.seed,
        "dtype": study.export.dtype,
    }
    return recipe_from_data(data, source=str(study.path), base_dir=None)
