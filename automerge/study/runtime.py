"""Everything a study keeps resident: the merge plan, the search space, the payload jobs, the render
session (sources on the device, the pipeline around the live weights) and the reward. Built once per
run; trials only call ``evaluate``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from automerge.checkpoints import warm_hash_cache
from automerge.errors import ConfigError, RenderError, StudyError
from automerge.merge import BlockParams, MergePlan, open_plan, plan_checkpoint
from automerge.render import RenderJob, load_payload
from automerge.render.checks import PromptCollapseCheck
from automerge.render.renderer import RenderedImage
from automerge.render.session import RenderSession
from automerge.rewards import CompositeReward, ReferenceReward, Reward, ScoreResult, load_reward
from automerge.study.config import InlineReward, Scoring, StudyFile
from automerge.study.space import SearchSpace, build_space, target_params
from automerge.terminal import Status
from automerge.tiny import write_tiny

Report = Callable[[int, float], None]
"""``report(payload index, score so far)`` after each payload; may raise ``optuna.TrialPruned``."""


@dataclass(frozen=True)
class StudyJob:
    """A render job within the study: its payload, its preview rung (None: the full payload) and a
    study-wide unique key (``p0-i03-s0002``; ``f0-p0-i03-s0002`` for a preview; ``v0-i03-s0002`` for
    a validation payload's, so that a held-out image never meets a study image's reference)."""

    payload: int
    job: RenderJob
    fidelity: int | None = None
    held_out: bool = False

    @property
    def key(self) -> str:
        prefix = "" if self.fidelity is None else f"f{self.fidelity}-"
        return f"{prefix}{'v' if self.held_out else 'p'}{self.payload}-{self.job.key}"


@dataclass
class Evaluation:
    """One evaluated parameter set: the trial value and everything the report and dashboard show.
    With several objectives, ``objective_scores`` holds each one's score (``value`` is the first's)
    and ``objective_image_scores`` each one's image scores; ``payload_scores`` and ``image_scores``
    are then empty."""

    value: float
    payload_scores: list[float]
    reward_scores: dict[str, float]  # mean raw score per reward component ("OBJECTIVE.component")
    images: dict[str, Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    image_scores: dict[str, float] = field(default_factory=dict)  # image key → its combined score
    objective_scores: dict[str, float] = field(default_factory=dict)  # objective → score, in order
    objective_image_scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def told(self) -> float | list[float]:
        """What Optuna is told: the value, or each objective's score."""
        return list(self.objective_scores.values()) if self.objective_scores else self.value


@dataclass(frozen=True)
class LoadedObjective:
    """One loaded score of the study: its name, direction and reward (``reward:`` is one of these)."""

    name: str
    direction: str
    reward: Reward | CompositeReward


@dataclass(frozen=True)
class GuardPanel:
    """The guard's members (each a loaded reward with its direction) and the jobs they score."""

    members: list[LoadedObjective]
    jobs: list[StudyJob]


@dataclass
class _Tally:
    """One objective's running score over a trial's payloads: Σ weight·score / Σ weight."""

    weighted: float = 0.0
    total_weight: float = 0.0
    payload_scores: list[float] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    image_scores: dict[str, float] = field(default_factory=dict)

    def add(self, keys: Sequence[str], weights: Sequence[float], result: ScoreResult) -> None:
        """One payload's images, scored."""
        for component in result.components:
            self.raw.setdefault(component.name, []).extend(component.raw)
        payload_value = sum(w * s for w, s in zip(weights, result.scores, strict=True)) / sum(weights)
        self.payload_scores.append(payload_value)
        self.weighted += payload_value * sum(weights)
        self.total_weight += sum(weights)
        self.image_scores.update({key: float(v) for key, v in zip(keys, result.scores, strict=True)})

    @property
    def value(self) -> float:
        return self.weighted / self.total_weight

    def reward_scores(self) -> dict[str, float]:
        """Mean raw score per reward component."""
        return {name: sum(values) / len(values) for name, values in self.raw.items()}


def generate_models(study: StudyFile) -> None:
    """Write the study's ``generate:`` tiny models that do not exist yet (``like`` ones after their base)."""
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


def open_study_plan(study: StudyFile) -> MergePlan:
    """The study's merge (its models, method, fixed params, seed and export dtype), checked and open."""
    return open_plan(
        study.models,
        study.method,
        params=study.params,
        loras=study.loras,
        seed=study.seed,
        dtype=study.export.dtype,
        source=str(study.path),
    )


def study_jobs(
    payloads: Sequence[Path], *, fidelity: int | None = None, held_out: bool = False
) -> list[StudyJob]:
    """Every payload's jobs (at preview rung ``fidelity``, or in full; ``held_out``: validation's)."""
    return [
        StudyJob(i, job, fidelity, held_out)
        for i, path in enumerate(payloads)
        for job in load_payload(path).jobs(fidelity=fidelity)
    ]


def preview_rungs(study: StudyFile) -> int:
    """How many previews a trial renders before its full payload: the payloads' common number of
    ``fidelities`` with ``multi_fidelity`` on, else 0."""
    if study.multi_fidelity is None:
        return 0
    counts = {str(path): len(load_payload(path).fidelities) for path in study.payloads}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        shown = ", ".join(f"{path} has {count}" for path, count in counts.items())
        raise ConfigError(
            f"{study.path}: multi_fidelity needs the same number (≥ 1) of fidelities in every payload "
            f"({shown}); add fidelities: [{{steps: 4, seeds: 1}}] to each, or remove multi_fidelity"
        )
    return next(iter(counts.values()))


class StudyRuntime:
    """The resident state of a running study."""

    def __init__(self, study: StudyFile, *, device: str | None = None, status: Status | None = None) -> None:
        status = status or (lambda text: None)
        # 1. Sources (headers only), search space and payloads: every check before any tensor loads.
        status("checking the models' headers, the search space and the payloads")
        self.config = study.render if device is None else study.render.model_copy(update={"device": device})
        self.config.torch_device(where=f"{study.path}: render.device")  # no GPU: said before any work
        generate_models(study)
        self.study = study
        self.plan = open_study_plan(study)
        try:
            self.space: SearchSpace = build_space(
                study, self.plan.arch, self.plan.method, model_names=self.plan.model_names
            )
            self.jobs = study_jobs(study.payloads)
            self.preview_jobs = [study_jobs(study.payloads, fidelity=r) for r in range(preview_rungs(study))]
            self.validation_jobs = study_jobs(study.validation_payloads, held_out=True)
            # a hidden target is rendered at every fidelity, so previews are scored against their own
            # kind, and for the validation payloads, so held-out images have references of their own
            self.reference_sets = [self.jobs, *self.preview_jobs, self.validation_jobs]
            self.reference_jobs = [job for jobs in self.reference_sets for job in jobs]
            # 2. The export's metadata names each source's sha256: hash them while the study runs.
            warm_hash_cache(dict.fromkeys(m.path for m in self.plan.sources.values() if m.path.is_file()))
            # 3. The render session: sources on the device, the pipeline around the live weights.
            self.session = RenderSession(
                self.plan, self.config, status=status, live_loras=self.space.live_loras
            )
            self.device = self.session.device
            # 4. The reward, or each objective's (a reference target is rendered once, here).
            self.reference_images: dict[str, Image.Image] = {}  # the report shows them beside the best
            self.objectives = [
                LoadedObjective(scoring.name, scoring.direction, self._reward(scoring, status))
                for scoring in study.scorings
            ]
            # 5. The guard's panel (guard.py): its own rewards, or the study's on held-out payloads.
            self.guard: GuardPanel | None = None
            if study.guard is not None:
                members = (
                    [
                        LoadedObjective(s.name, s.direction, self._reward(s, status))
                        for s in study.guard_scorings
                    ]
                    if study.guard.rewards
                    else self.objectives
                )
                jobs = self.validation_jobs if study.guard_payloads == "validation" else self.jobs
                self.guard = GuardPanel(members, jobs)
        except BaseException:
            self.plan.close()
            raise

    @property
    def reward(self) -> Reward | CompositeReward:
        """The study's reward (its first objective's, with several)."""
        return self.objectives[0].reward

    def _reward(self, scoring: Scoring, status: Status) -> Reward | CompositeReward:
        reward = scoring.reward
        if isinstance(reward, Path):
            status(f"loading the reward model {reward.stem}")
            loaded = load_reward(reward, device=str(self.device))
            if isinstance(loaded, CompositeReward) and any(m.mode == "zscore" for m in loaded.members):
                self._fit_zscores(loaded, status)
            return loaded
        assert isinstance(reward, InlineReward) and reward.reference is not None  # human: no scorings
        reference = reward.reference
        if reference.folder is not None:
            return Reward(ReferenceReward(metric=reference.metric, directory=reference.folder))
        if reference.target is not None:
            params = target_params(self.study, self.plan, reward=reward, field=scoring.field)
            status(f"rendering the hidden target's {len(self.reference_jobs)} reference images")
            self.session.apply(params)
            images = _render_sets(self.session, self.reference_sets)
        else:
            assert reference.checkpoint is not None
            status(f"rendering {len(self.reference_jobs)} reference images with {reference.checkpoint.name}")
            images = self._render_checkpoint(reference.checkpoint, field=scoring.field)
        if not self.reference_images:  # the first reference's (the only one of a study with one score)
            self.reference_images = images
        return Reward(ReferenceReward.from_images(images, metric=reference.metric))

    def _fit_zscores(self, reward: CompositeReward, status: Status) -> None:
        """μ, σ of each z-scored member from its raw scores on the renders of the space's baselines
        (pure A, pure B, the midpoint): deterministic, so every worker fits the same statistics."""
        baselines = self.space.baselines()
        status(f"fitting the z-scores on {len(baselines) * len(self.jobs)} baseline renders")
        images, prompts, keys = [], [], []
        for baseline in baselines:
            rendered = self.render_images(self.space.block_params(baseline.values), self.jobs)
            images += [rendered[job.key] for job in self.jobs]
            prompts += [job.job.prompt for job in self.jobs]
            keys += [job.key for job in self.jobs]  # a reference member looks its image up by key
        reward.set_baseline(reward.raw_scores(images, prompts, keys=keys))

    def _render_checkpoint(self, checkpoint: Path, *, field: str = "reward") -> dict[str, Image.Image]:
        """Reference images rendered once from another checkpoint, with its own short-lived session."""
        plan = plan_checkpoint(checkpoint)
        try:
            if plan.arch.name != self.plan.arch.name:
                raise StudyError(
                    f"{self.study.path}: {field}.reference.checkpoint {checkpoint} is {plan.arch.name}, "
                    f"the study's models are {self.plan.arch.name}"
                )
            session = RenderSession(plan, self.config)
            session.apply()
            return _render_sets(session, self.reference_sets)
        finally:
            plan.close()

    # -- trials ------------------------------------------------------------------------------------

    def render_images(self, params: BlockParams, jobs: Sequence[StudyJob]) -> dict[str, Image.Image]:
        """``jobs``' images at ``params``, rendered payload by payload as ``evaluate`` renders them."""
        self.session.apply(params)
        return _render_payloads(self.session, jobs)

    def evaluate(
        self,
        params: BlockParams,
        jobs: Sequence[StudyJob],
        *,
        report: Report | None = None,
        on_stage: Status | None = None,
        objectives: Sequence[LoadedObjective] | None = None,
    ) -> Evaluation:
        """Merge in place, render and score ``jobs`` payload by payload, each image rendered once and
        scored by every objective (``objectives``: others, e.g. the guard's); ``report(step, value)``
        after each payload (the first objective's value) may raise to prune; ``on_stage(name)`` as each
        stage starts. Value = Σ weight·score / Σ weight over every image."""
        on_stage = on_stage or (lambda name: None)
        objectives = self.objectives if objectives is None else objectives
        timings = {"merge": 0.0, "render": 0.0, "score": 0.0}
        on_stage("merge")
        started = time.perf_counter()
        self.session.apply(params)
        timings["merge"] = time.perf_counter() - started
        images: dict[str, Image.Image] = {}
        tallies = [_Tally() for _ in objectives]
        collapse = PromptCollapseCheck()
        for group in payload_groups(jobs):
            on_stage("render")
            started = time.perf_counter()
            rendered = self.session.render([job.job for job in group])
            timings["render"] += time.perf_counter() - started
            _refuse_collapsed(collapse.add(rendered))
            on_stage("score")
            started = time.perf_counter()
            keys = [job.key for job in group]
            results = [
                objective.reward.score(
                    [r.image for r in rendered], [job.job.prompt for job in group], keys=keys
                )
                for objective in objectives
            ]
            timings["score"] += time.perf_counter() - started
            for tally, result in zip(tallies, results, strict=True):
                tally.add(keys, [job.job.weight for job in group], result)
            images.update({job.key: r.image for job, r in zip(group, rendered, strict=True)})
            if report is not None:
                report(len(tallies[0].payload_scores) - 1, tallies[0].value)
        return _evaluation(objectives, tallies, images, timings)

    def guard_scores(
        self, values: Mapping[str, float]
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The guard panel's scores of one trial's values (Optuna's, by dimension name): member → panel
        score, member → image key → score."""
        assert self.guard is not None
        members = self.guard.members
        evaluation = self.evaluate(self.space.block_params(dict(values)), self.guard.jobs, objectives=members)
        if len(members) == 1:
            return {members[0].name: evaluation.value}, {members[0].name: dict(evaluation.image_scores)}
        return dict(evaluation.objective_scores), {
            k: dict(v) for k, v in evaluation.objective_image_scores.items()
        }

    def close(self) -> None:
        self.plan.close()


def _evaluation(
    objectives: Sequence[LoadedObjective],
    tallies: Sequence[_Tally],
    images: dict[str, Image.Image],
    timings: dict[str, float],
) -> Evaluation:
    """The trial's evaluation from each objective's tally; a non-finite score is a ``StudyError``."""
    for objective, tally in zip(objectives, tallies, strict=True):
        if not math.isfinite(tally.value):
            which = f"objective {objective.name}'s score" if len(tallies) > 1 else "the trial score"
            raise StudyError(f"{which} is {tally.value} (a reward returned a non-finite value)")
    if len(tallies) == 1:
        only = tallies[0]
        return Evaluation(
            only.value, only.payload_scores, only.reward_scores(), images, timings, only.image_scores
        )
    pairs = list(zip(objectives, tallies, strict=True))
    return Evaluation(
        tallies[0].value,
        [],
        {f"{o.name}.{component}": value for o, t in pairs for component, value in t.reward_scores().items()},
        images,
        timings,
        objective_scores={o.name: t.value for o, t in pairs},
        objective_image_scores={o.name: t.image_scores for o, t in pairs},
    )


def _refuse_collapsed(pair: tuple[RenderedImage, RenderedImage] | None) -> None:
    """Fail the trial (``RenderError``) when two different prompts gave the same picture."""
    if pair is not None:
        first, second = (image.job for image in pair)
        raise RenderError(
            f"images {first.key} and {second.key} are the same picture for different prompts "
            f"({first.prompt!r}, {second.prompt!r}; seed {first.seed}): the merge ignores the prompt "
            "(collapsed text conditioning)"
        )


def payload_groups(jobs: Sequence[StudyJob]) -> list[list[StudyJob]]:
    """``jobs`` by payload (sorted), each group in the jobs' order: what one ``session.render`` call
    renders. References and trials are rendered in the same groups, so an image always shares its
    batch with the same others: a CPU's batched arithmetic may differ in a last bit with the batch's
    other images (seen: one channel of one 64×64 pixel one step apart), and a hidden target must score
    exactly 0 against its own references."""
    return [
        [job for job in jobs if job.payload == payload] for payload in sorted({job.payload for job in jobs})
    ]


def _render_sets(session: RenderSession, sets: Sequence[Sequence[StudyJob]]) -> dict[str, Image.Image]:
    """Every set's images (the study's, each preview rung's, the validation payloads'), each set
    rendered as ``evaluate`` renders it."""
    return {key: image for jobs in sets for key, image in _render_payloads(session, jobs).items()}


def _render_payloads(session: RenderSession, jobs: Sequence[StudyJob]) -> dict[str, Image.Image]:
    images: dict[str, Image.Image] = {}
    for group in payload_groups(jobs):
        rendered = session.render([job.job for job in group])
        images.update({job.key: image.image for job, image in zip(group, rendered, strict=True)})
    return images
