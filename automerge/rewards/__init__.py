"""Reward models, loaded offline from manifests: the ``RewardModel`` protocol and the ``REWARDS``
registry of plug-ins (what a new reward implements), loading and scoring (what a user calls),
normalisation and composites, weight checks and the one fetch step.

Built-in plug-ins (registered by the explicit imports below): ``imagereward``, ``laion-aesthetic``,
``aesthetic-v25``, ``clip-score``, ``pickscore``, ``reference``.
"""

from automerge.quiet import drop_torchvision_notice
from automerge.rewards.base import (
    REWARDS,
    LoadRequest,
    RewardContext,
    RewardModel,
    RewardPlugin,
    WeightRole,
    register_reward,
)
from automerge.rewards.files import fetch_reward_weights
from automerge.rewards.loader import ImageScore, dumps_scores, load_reward, score_folder
from automerge.rewards.manifest import CompositeManifest, RewardManifest, find_manifest, read_manifest
from automerge.rewards.reference import ReferenceReward
from automerge.rewards.scoring import ComponentScores, CompositeReward, Reward, ScoreResult

drop_torchvision_notice()  # before the plug-ins import transformers

# Built-in plug-ins: importing registers them.
from automerge.rewards import aesthetic, clip, imagereward, reference  # noqa: E402, F401, I001  isort: skip

__all__ = [
    "REWARDS",
    "ComponentScores",
    "CompositeManifest",
    "CompositeReward",
    "ImageScore",
    "LoadRequest",
    "ReferenceReward",
    "Reward",
    "RewardContext",
    "RewardManifest",
    "RewardModel",
    "RewardPlugin",
    "ScoreResult",
    "WeightRole",
    "dumps_scores",
    "fetch_reward_weights",
    "load_reward",
    "find_manifest",
    "read_manifest",
    "register_reward",
    "score_folder",
]
