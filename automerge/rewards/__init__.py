"""Reward models, loaded offline from manifests: the ``RewardModel`` protocol, the ``REWARDS``
registry of plug-ins, normalisation and composites, weight checks and the one fetch step.

Built-in plug-ins (registered by the explicit imports below): ``imagereward``, ``laion-aesthetic``,
``aesthetic-v25``, ``clip-score``, ``pickscore``, ``reference``.
"""

from automerge.rewards.base import (
    REWARDS,
    LoadRequest,
    RewardContext,
    RewardModel,
    RewardPlugin,
    WeightRole,
    register_reward,
)
from automerge.rewards.manifest import (
    AffineNormalize,
    CompositeManifest,
    CompositeMember,
    HubSource,
    NoNormalize,
    RewardManifest,
    read_manifest,
)

# Built-in plug-ins: importing registers them.
from automerge.rewards import aesthetic, clip, imagereward, reference  # noqa: E402, I001  isort: skip

from automerge.rewards.aesthetic import AestheticV25, LaionAesthetic
from automerge.rewards.clip import ClipScore
from automerge.rewards.files import fetch_reward_weights, sha256_file
from automerge.rewards.imagereward import ImageReward, remap_imagereward_state_dict
from automerge.rewards.loader import ImageScore, dumps_scores, load_reward, score_folder
from automerge.rewards.reference import ReferenceReward
from automerge.rewards.scoring import ComponentScores, CompositeReward, Reward, ScoreResult

__all__ = [
    "REWARDS",
    "AestheticV25",
    "AffineNormalize",
    "ClipScore",
    "ComponentScores",
    "CompositeManifest",
    "CompositeMember",
    "CompositeReward",
    "HubSource",
    "ImageReward",
    "ImageScore",
    "LaionAesthetic",
    "LoadRequest",
    "NoNormalize",
    "ReferenceReward",
    "Reward",
    "RewardContext",
    "RewardManifest",
    "RewardModel",
    "RewardPlugin",
    "ScoreResult",
    "WeightRole",
    "aesthetic",
    "clip",
    "dumps_scores",
    "fetch_reward_weights",
    "imagereward",
    "load_reward",
    "read_manifest",
    "reference",
    "register_reward",
    "remap_imagereward_state_dict",
    "score_folder",
    "sha256_file",
]
