"""Load a reward from its manifest (single or composite) and score a folder of rendered PNGs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from automerge.dtypes import TORCH_DTYPES
from automerge.errors import RewardError
from automerge.quiet import no_loading_bars
from automerge.rewards.base import REWARDS, LoadRequest, RewardContext, RewardModel
from automerge.rewards.files import resolve_weights
from automerge.rewards.manifest import (
    CompositeManifest,
    RewardManifest,
    find_manifest,
    parse_options,
    read_manifest,
)
from automerge.rewards.scoring import CompositeReward, Member, Reward

AnyReward = Reward | CompositeReward


def load_reward(
    manifest_path: Path | str, *, device: str | None = None, context: RewardContext | None = None
) -> AnyReward:
    """The reward a manifest describes, ready to ``score(images, prompts, keys=…)``.

    ``device`` overrides the manifest's ``device``. Weight files are checked (existence, sha256)
    before anything is built; nothing is downloaded."""
    no_loading_bars()  # transformers' bars would break the caller's status line
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    context = context or RewardContext()
    if isinstance(manifest, CompositeManifest):
        return _load_composite(manifest, manifest_path, device=device, context=context)
    return _load_single(manifest, manifest_path, device=device, context=context)


def _load_single(
    manifest: RewardManifest, manifest_path: Path, *, device: str | None, context: RewardContext
) -> Reward:
    import torch

    request = LoadRequest(
        manifest_path=manifest_path,
        manifest=manifest,
        options=parse_options(manifest, manifest_path),
        weights=resolve_weights(manifest, manifest_path),
        device=torch.device(device or manifest.device),
        dtype=TORCH_DTYPES[manifest.dtype],
        context=context,
    )
    model: RewardModel = REWARDS.get(manifest.reward).load(request)
    return Reward(model, normalize=manifest.normalize, batch_size=manifest.batch_size)


def _load_composite(
    manifest: CompositeManifest, manifest_path: Path, *, device: str | None, context: RewardContext
) -> CompositeReward:
    members = []
    for index, member in enumerate(manifest.members):
        member_path = find_manifest(member.manifest, near=manifest_path.parent)
        loaded = read_manifest(member_path)
        if isinstance(loaded, CompositeManifest):
            raise RewardError(f"{manifest_path}: members.{index}: {member_path} is itself a composite")
        reward = _load_single(loaded, member_path, device=device, context=context)
        members.append(Member(reward, member.weight, member.normalize))
    return CompositeReward(members, name=manifest.display_name(manifest_path), combine=manifest.combine)


@dataclass(frozen=True)
class ImageScore:
    """The score of one PNG: its key and prompt (from PNG text chunks), combined score, components."""

    path: Path
    key: str
    prompt: str
    score: float
    raw: dict[str, float] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)
    item: str | None = None
    seed: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "key": self.key,
            "item": self.item,
            "seed": self.seed,
            "prompt": self.prompt,
            "score": self.score,
            "raw": self.raw,
            "normalized": self.normalized,
        }


@dataclass(frozen=True)
class _Rendered:
    path: Path
    image: Image.Image
    key: str
    prompt: str | None
    item: str | None
    seed: int | None


def read_rendered_png(path: Path) -> _Rendered:
    """A rendered PNG and its text chunks ``prompt``, ``key``, ``item``, ``seed`` (key defaults to the
    file stem)."""
    try:
        with Image.open(path) as opened:
            chunks = dict(getattr(opened, "text", {}) or {})
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise RewardError(f"{path}: cannot be read as an image ({error})") from None
    seed_text = chunks.get("seed")
    try:
        seed = int(seed_text) if seed_text is not None else None
    except ValueError:
        raise RewardError(f"{path}: text chunk 'seed' is {seed_text!r}, not an integer") from None
    return _Rendered(
        path, image, chunks.get("key") or path.stem, chunks.get("prompt"), chunks.get("item"), seed
    )


def score_folder(
    manifest_path: Path | str,
    folder: Path | str,
    *,
    device: str | None = None,
    context: RewardContext | None = None,
) -> list[ImageScore]:
    """Score every ``*.png`` in ``folder`` (sorted by name) with the manifest's reward, prompts and
    keys read from the renderer's PNG text chunks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RewardError(f"{folder}: folder not found")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise RewardError(f"{folder}: no .png images to score")
    reward = load_reward(manifest_path, device=device, context=context)
    rendered = [read_rendered_png(path) for path in paths]
    _check_prompts(rendered, reward)
    result = reward.score(
        [r.image for r in rendered], [r.prompt or "" for r in rendered], keys=[r.key for r in rendered]
    )
    return [
        ImageScore(
            r.path, r.key, r.prompt or "", result.scores[i], **result.per_image(i), item=r.item, seed=r.seed
        )
        for i, r in enumerate(rendered)
    ]


def _check_prompts(rendered: Sequence[_Rendered], reward: AnyReward) -> None:
    models = (
        [member.reward.model for member in reward.members]
        if isinstance(reward, CompositeReward)
        else [reward.model]
    )
    readers = [model.name for model in models if getattr(model, "uses_prompts", True)]
    unprompted = [r.path for r in rendered if r.prompt is None]
    if readers and unprompted:
        raise RewardError(
            f"{unprompted[0]}: no 'prompt' text chunk, but reward '{readers[0]}' scores image–prompt pairs; "
            "score images written by the automerge renderer"
        )


def dumps_scores(scores: Sequence[ImageScore]) -> str:
    """JSON lines of ``ImageScore.to_json`` (for ``automerge score --json``)."""
    return "\n".join(json.dumps(score.to_json(), sort_keys=True) for score in scores)
