"""Test helpers that ship with the package, for the test suite, the benchmarks and authors of new
rewards: random reward models with the real architectures and file layouts, each written to a folder
with its manifest — tiny ones (``TINY_REWARDS`` has one writer per built-in plug-in) and ImageReward and
the LAION aesthetic predictor at their published sizes (``write_random_*``). Tiny checkpoints of the
real model layouts are a product feature: ``automerge.tiny``."""

from automerge.testing.tiny_rewards import (
    BERT_BASE,
    TINY_BERT,
    TINY_REWARDS,
    TINY_VISION,
    BertSizes,
    tiny_image,
    write_random_imagereward,
    write_random_laion_aesthetic,
    write_reference,
    write_tiny_aesthetic_v25,
    write_tiny_clip_score,
    write_tiny_imagereward,
    write_tiny_laion_aesthetic,
)

__all__ = [
    "BERT_BASE",
    "TINY_BERT",
    "TINY_REWARDS",
    "TINY_VISION",
    "BertSizes",
    "tiny_image",
    "write_random_imagereward",
    "write_random_laion_aesthetic",
    "write_reference",
    "write_tiny_aesthetic_v25",
    "write_tiny_clip_score",
    "write_tiny_imagereward",
    "write_tiny_laion_aesthetic",
]
