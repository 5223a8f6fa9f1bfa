"""sd-mecha recipes (its ``.mecha`` text format, version 0.1.0): the same per-block merge for
``sd_mecha.deserialize`` / ``sd-mecha merge``.

A per-block merge is the models, the block weights as a ``dict`` in sd-mecha's supermerger block
config, converted to the model's key layout, then the method; instruction ``&N`` is the N-th line after
the version line. Where the results differ (sd-mecha 1.1.8): sd-mecha weights ``time_embed`` (and
SDXL ``label_emb``) with BASE, automerge and supermerger with IN00; the VAE stays A's in both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from automerge.errors import ConfigError
from automerge.interop._blocks import block_alphas
from automerge.merge import BlockParams

MODEL_CONFIGS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}
"""automerge family → sd-mecha model config (the original checkpoint layout)."""

BLOCK_CONVERTERS = {"sd1": "convert_sd1_blocks_to_ldm", "sdxl": "convert_sdxl_blocks_to_sgm"}
METHODS = ("weighted_sum", "add_difference")

DIFFERENCE = (
    "sd-mecha weights time_embed (SDXL: and label_emb) with BASE; automerge and supermerger with IN00"
)


def mecha_recipe(
    method: str,
    params: BlockParams,
    family: str,
    blocks: Sequence[str],
    models: Mapping[str, Path],
    *,
    title: str = "",
) -> str:
    """The ``.mecha`` text of ``method`` with per-block ``params`` on ``models`` (by letter: a, b and,
    for add_difference, c); a block automerge leaves unmerged has weight 0 (A). No trailing newline:
    sd-mecha's reader refuses an empty last line."""
    if method not in METHODS:
        raise ConfigError(
            f"--format mecha: only {', '.join(METHODS)} are written as sd-mecha recipes so far, not '{method}'"
        )
    if family not in MODEL_CONFIGS:
        raise ConfigError(f"--format mecha: sd-mecha recipes are written for sd1 and sdxl, not {family}")
    weights = block_alphas(params, blocks, output_format="mecha")
    if family == "sdxl":
        weights["VAE"] = 0.0  # A's VAE, as automerge keeps it
    config = MODEL_CONFIGS[family]
    lines = [
        f'model {json.dumps(str(models[letter]))} model_config="{config}" merge_space="weight"'
        for letter in ("a", "b", "c")[: 3 if method == "add_difference" else 2]
    ]
    if method == "add_difference":
        lines.append('merge "subtract" &1 &2')
    table = len(lines)
    lines += [
        "dict " + " ".join(f"{block}={value!r}" for block, value in weights.items()),
        f'literal &{table} model_config="{family}-supermerger_blocks" merge_space="param"',
        f'merge "{BLOCK_CONVERTERS[family]}" &{table + 1}',
    ]
    converted = table + 2
    if method == "weighted_sum":
        lines.append(f'merge "weighted_sum" &0 &1 &{converted}')
    else:
        lines += [f'merge "add_difference" &0 &3 &{converted}', f'merge "fallback" &{converted + 1} &0']
    header = [
        f"# {title} (automerge export --format mecha)" if title else "# automerge export --format mecha"
    ]
    header.append(f"# where sd-mecha's result differs: {DIFFERENCE}")
    return "\n".join(["version 0.1.0", *header, *lines])
