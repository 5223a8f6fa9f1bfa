"""Model families as data: MBW block layouts, original-layout key → block and → diffusers parameter
rules, the configs of the live modules (real and tiny), pipeline facts and family detection.

Each family is one file in ``data/families/``, loaded into an ``Architecture`` and registered in
``ARCHITECTURES`` when this package is imported.
"""

from automerge.arch._base import ARCHITECTURES, EMA_PREFIX, VAE_BLOCK, Architecture, Component
from automerge.arch._loader import register_families
from automerge.arch._targets import Target, View
from automerge.arch.detect import detect_architecture, detect_folder_architecture
from automerge.arch.reference import ReferenceKey, reference_keys

register_families()

__all__ = [
    "ARCHITECTURES",
    "EMA_PREFIX",
    "VAE_BLOCK",
    "Architecture",
    "Component",
    "ReferenceKey",
    "Target",
    "View",
    "detect_architecture",
    "detect_folder_architecture",
    "reference_keys",
]
