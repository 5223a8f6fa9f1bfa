"""Checkpoint reading and writing: lazy safetensors, weights-only pickles, atomic streaming writes, hashes.

Readers implement the ``Checkpoint`` protocol: keys in the file's own layout, ``info`` from the header
only, ``load`` one tensor at a time on the CPU.
"""

from automerge.checkpoints._base import Checkpoint, TensorInfo
from automerge.checkpoints._hashing import a1111_short_hash, cached_sha256, sha256_file, warm_hash_cache
from automerge.checkpoints._open import open_file_checkpoint
from automerge.checkpoints._pickle_reader import open_pickle_checkpoint
from automerge.checkpoints._safetensors_reader import open_safetensors
from automerge.checkpoints._writer import SafetensorsWriter, save_safetensors

__all__ = [
    "Checkpoint",
    "SafetensorsWriter",
    "TensorInfo",
    "a1111_short_hash",
    "cached_sha256",
    "open_file_checkpoint",
    "open_pickle_checkpoint",
    "open_safetensors",
    "save_safetensors",
    "sha256_file",
    "warm_hash_cache",
]
