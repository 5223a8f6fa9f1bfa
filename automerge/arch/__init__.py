"""Model families: MBW block layouts, original-layout key → block and → diffusers parameter rules,
family detection, and the configs of the live modules."""

from automerge.arch import families
from automerge.arch._base import ARCHITECTURES, EMA_PREFIX, VAE_BLOCK, Architecture, Component, Target, View
from automerge.arch.detect import detect_architecture
from automerge.arch.families import tiny_configs
from automerge.arch.reference import reference_keys

__all__ = [
    "ARCHITECTURES",
    "EMA_PREFIX",
    "VAE_BLOCK",
    "Architecture",
    "Component",
    "Target",
    "View",
    "detect_architecture",
    "families",
    "reference_keys",
    "tiny_configs",
]
