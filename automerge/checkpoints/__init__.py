"""Checkpoint reading and writing: lazy safetensors, weights-only pickles, diffusers folders, atomic
streaming writes, hashes.

``open_model`` opens any supported checkpoint (a single file or a diffusers folder) as an
original-layout ``Checkpoint`` with its family. Readers implement the ``Checkpoint`` protocol: keys in
the file's own layout, ``info`` from the header only, ``load`` one tensor at a time on the CPU.
"""

from automerge.checkpoints._base import Checkpoint, TensorInfo
from automerge.checkpoints._duplicates import duplicate_files
from automerge.checkpoints._hashing import (
    CACHE_DIR_VARIABLE,
    a1111_legacy_hash,
    a1111_short_hash,
    cached_sha256,
    sha256_file,
    warm_hash_cache,
)
from automerge.checkpoints._open import open_file_checkpoint
from automerge.checkpoints._pickle_reader import open_pickle_checkpoint
from automerge.checkpoints._safetensors_reader import open_safetensors
from automerge.checkpoints._writer import (
    ResumableSafetensorsWriter,
    SafetensorsWriter,
    partial_paths,
    save_safetensors,
)
from automerge.checkpoints.model import CONFIGS_METADATA_KEY, SourceModel, header_json_object, open_model
from automerge.checkpoints.summary import ModelSummary, summarize

__all__ = [
    "header_json_object",
    "CACHE_DIR_VARIABLE",
    "CONFIGS_METADATA_KEY",
    "Checkpoint",
    "ModelSummary",
    "ResumableSafetensorsWriter",
    "SafetensorsWriter",
    "SourceModel",
    "TensorInfo",
    "a1111_legacy_hash",
    "a1111_short_hash",
    "cached_sha256",
    "duplicate_files",
    "partial_paths",
    "open_file_checkpoint",
    "open_model",
    "open_pickle_checkpoint",
    "open_safetensors",
    "save_safetensors",
    "sha256_file",
    "summarize",
    "warm_hash_cache",
]
