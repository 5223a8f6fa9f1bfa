"""The search suite's problems: hidden-target merges generated from seeds, so that no default is tuned
to one problem.

A problem merges tiny models of one family (``write_tiny``) with secret parameters; the reward is the
negative MSE of a trial's renders against the secret merge's renders (``reward.reference.target``), so
the optimum is known and scores exactly 0. Kinds, per family (``KINDS`` gives how many of each):

- ``groups``: weighted-sum ``alpha`` per resolution group (6 groups, as ``studies/demo.yaml``);
- ``cuts``: ``alpha`` per group of 5 contiguous groups at random cut points (BASE alone first);
- ``all``: ``alpha`` per block (26 for SD1, 20 for SDXL);
- ``ties``: TIES ``alpha`` and ``density`` per group of 3 (two searched parameters, base model c);
- ``frozen``: as ``groups``, but B equals A in two groups' blocks, whose dimensions then do not
  change the renders at all (non-identifiable: only the score, not the weight error, says anything).

Secrets: each dimension is near a range edge with probability 0.3 (within 8 % of it), else uniform in
the inner 80 % — so some blocks sit at an edge and some in the valleys next to plateaus that the
response of the text encoder and the shallow blocks makes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from automerge.arch import ARCHITECTURES
from automerge.checkpoints import open_file_checkpoint, save_safetensors
from automerge.tiny import write_tiny

KINDS: dict[str, int] = {"groups": 6, "cuts": 5, "all": 4, "ties": 3, "frozen": 2}  # 20 per family
EDGE_PROBABILITY = 0.3
RESOLUTION_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {
        "BASE": ("BASE",),
        "IN_shallow": tuple(f"IN{i:02d}" for i in range(6)),
        "IN_deep": tuple(f"IN{i:02d}" for i in range(6, 10)),
        "MID": ("IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02"),
        "OUT_deep": tuple(f"OUT{i:02d}" for i in range(3, 9)),
        "OUT_shallow": ("OUT09", "OUT10", "OUT11"),
    },
    "sdxl": {
        "BASE": ("BASE",),
        "IN_shallow": ("IN00", "IN01", "IN02", "IN03"),
        "IN_mid": ("IN04", "IN05", "IN06"),
        "MID": ("IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02"),
        "OUT_mid": ("OUT03", "OUT04", "OUT05"),
        "OUT_shallow": ("OUT06", "OUT07", "OUT08"),
    },
}
PARAM_RANGES: dict[str, tuple[float, float]] = {"alpha": (0.0, 1.0), "density": (0.1, 1.0)}
TIES_ALPHA_RANGE = (0.2, 1.6)


@dataclass(frozen=True)
class Problem:
    """One hidden-target search problem."""

    name: str  # "sd1-groups-03"
    family: str
    kind: str
    method: str
    groups: Mapping[str, tuple[str, ...]]  # group (or block) name → its blocks
    params: tuple[str, ...]  # searched method parameters
    ranges: Mapping[str, tuple[float, float]]  # per parameter
    secret: Mapping[str, float]  # dimension name ("alpha.MID") → value
    frozen: tuple[str, ...] = field(default=())  # groups whose blocks have B = A

    def search(self) -> dict[str, Any]:
        """The study file's ``search:`` section."""
        return {
            param: {"groups": {g: list(b) for g, b in self.groups.items()}, "low": low, "high": high}
            for param, (low, high) in ((p, self.ranges[p]) for p in self.params)
        }

    def target(self) -> dict[str, dict[str, float]]:
        """The secret as per-block parameter maps (``reward.reference.target.params``)."""
        return {
            param: {
                block: self.secret[f"{param}.{group}"]
                for group, blocks in self.groups.items()
                for block in blocks
            }
            for param in self.params
        }


def draw(low: float, high: float, rng: random.Random) -> float:
    """Near an edge (within 8 % of the range) with probability 0.3, else in the inner 80 %."""
    span = high - low
    if rng.random() < EDGE_PROBABILITY:
        offset = rng.uniform(0.0, 0.08 * span)
        value = low + offset if rng.random() < 0.5 else high - offset
    else:
        value = rng.uniform(low + 0.1 * span, high - 0.1 * span)
    return round(value, 3)


def _cut_groups(blocks: Sequence[str], count: int, rng: random.Random) -> dict[str, tuple[str, ...]]:
    """BASE alone, then the other blocks in ``count - 1`` contiguous groups at random cut points."""
    rest = [b for b in blocks if b != "BASE"]
    cuts = sorted(rng.sample(range(1, len(rest)), count - 2))
    edges = [0, *cuts, len(rest)]
    groups = {"BASE": ("BASE",)}
    for index, (start, stop) in enumerate(zip(edges, edges[1:], strict=False)):
        groups[f"G{index}"] = tuple(rest[start:stop])
    return groups


def make_problem(family: str, kind: str, index: int, *, seed: int) -> Problem:
    """Problem ``index`` of ``kind`` for ``family``, drawn from ``random.Random((seed, family, kind, index))``."""
    rng = random.Random(f"{seed}/{family}/{kind}/{index}")
    blocks = ARCHITECTURES.get(family).merge_blocks
    method, params, frozen = "weighted_sum", ("alpha",), ()
    ranges = dict(PARAM_RANGES)
    if kind == "all":
        groups = {block: (block,) for block in blocks}
    elif kind == "cuts":
        groups = _cut_groups(blocks, 5, rng)
    elif kind == "ties":
        groups = _cut_groups(blocks, 3, rng)
        method, params, ranges["alpha"] = "ties", ("alpha", "density"), TIES_ALPHA_RANGE
    else:
        groups = dict(RESOLUTION_GROUPS[family])
        if kind == "frozen":
            frozen = tuple(sorted(rng.sample([g for g in groups if g != "BASE"], 2)))
    secret = {f"{p}.{g}": draw(*ranges[p], rng) for p in params for g in groups}
    name = f"{family}-{kind}-{index:02d}"
    return Problem(name, family, kind, method, groups, params, {p: ranges[p] for p in params}, secret, frozen)


def suite(families: Sequence[str], *, seed: int, kinds: Mapping[str, int] = KINDS) -> list[Problem]:
    """Every problem of the suite, family by family."""
    return [
        make_problem(family, kind, index, seed=seed)
        for family in families
        for kind, count in kinds.items()
        for index in range(count)
    ]


# -- files ------------------------------------------------------------------------------------------


def write_models(folder: Path, family: str) -> dict[str, Path]:
    """The family's tiny models (written once): a, b (a fine-tune of a, as in the demo) for the
    weighted sums; c and two fine-tunes of it, ta and tb, for TIES."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{family}-{name}.safetensors" for name in ("a", "b", "c", "ta", "tb")}
    specs = {
        "a": (1, None, 0.0),
        "b": (2, "a", 0.5),
        "c": (0, None, 0.0),
        "ta": (1, "c", 0.3),
        "tb": (2, "c", 0.3),
    }
    for name, (seed, like, delta) in specs.items():
        if not paths[name].exists():
            like_path = paths[like] if like else None
            write_tiny(family, paths[name], seed=seed, like=like_path, delta=delta or 0.05)
    return paths


def write_frozen(models: Mapping[str, Path], problem: Problem, folder: Path) -> Path:
    """B with A's tensors in the frozen groups' blocks (those dimensions then change nothing)."""
    path = folder / f"{problem.name}-b.safetensors"
    blocks = {block for group in problem.frozen for block in problem.groups[group]}
    arch = ARCHITECTURES.get(problem.family)
    with open_file_checkpoint(models["a"]) as a, open_file_checkpoint(models["b"]) as b:
        tensors = {
            key: (a if arch.block_of(key, b.info(key).dtype) in blocks else b).load(key) for key in b.keys()
        }
        save_safetensors(path, tensors, metadata=dict(b.metadata))
    return path


def problem_sources(problem: Problem, folder: Path, models: Mapping[str, Path]) -> dict[str, Path]:
    """The problem's models: ta, tb and base c for TIES; else a and b (b with A's frozen groups)."""
    if problem.method == "ties":
        return {"a": models["ta"], "b": models["tb"], "c": models["c"]}
    b = write_frozen(models, problem, folder) if problem.frozen else models["b"]
    return {"a": models["a"], "b": b}


def study_fields(
    problem: Problem, folder: Path, models: Mapping[str, Path], *, payload: Path
) -> dict[str, Any]:
    """A problem's study file without its score: models, method, search, payload, no baselines or
    early stopping, rendered on the CPU in fp32, batch 2."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = problem_sources(problem, folder, models)
    return {
        "name": problem.name,
        "models": {name: str(path) for name, path in sources.items()},
        "method": problem.method,
        "search": problem.search(),
        "payloads": [str(payload)],
        "baselines": False,
        "early_stopping": None,
        "render": {"device": "cpu", "dtype": "fp32", "batch_size": 2},
    }


def write_study(
    problem: Problem, folder: Path, models: Mapping[str, Path], *, payload: Path, previews: bool = False
) -> Path:
    """The problem's study file (target = the secret; render on the CPU in fp32, batch 2; with
    ``previews``, the payload's fidelities are rendered first: ``multi_fidelity``)."""
    study = study_fields(problem, folder, models, payload=payload)
    study["reward"] = {"reference": {"metric": "mse", "target": {"params": problem.target()}}}
    if previews:
        study["multi_fidelity"] = {}
    path = folder / f"{problem.name}{'-mf' if previews else ''}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def write_payload(
    folder: Path, *, px: int, steps: int, seeds: Sequence[int], preview: Mapping[str, int] | None = None
) -> Path:
    """One prompt at ``seeds`` (2 images by default), ``px`` pixels, ``steps`` Euler steps, no CFG;
    ``preview``: its one cheaper fidelity (e.g. ``{"steps": 1}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"-{k}{v}" for k, v in (preview or {}).items())
    path = folder / f"payload-{px}px-{steps}steps-{len(seeds)}seeds{tag}.yaml"
    defaults = {
        "steps": steps,
        "cfg": 1.0,
        "width": px,
        "height": px,
        "scheduler": "euler",
        "seeds": list(seeds),
    }
    payload: dict[str, Any] = {
        "defaults": defaults,
        "items": [{"prompt": "a lighthouse on a cliff at dusk, oil painting"}],
    }
    if preview:
        payload["fidelities"] = [dict(preview)]
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path
