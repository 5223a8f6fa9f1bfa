"""What every block-weight recipe format needs: one alpha per MBW block."""

from __future__ import annotations

from collections.abc import Sequence

from automerge.errors import ConfigError
from automerge.merge import BlockParams


def block_alphas(params: BlockParams, blocks: Sequence[str], *, output_format: str) -> dict[str, float]:
    """Alpha of each of ``blocks`` (0.0, A's share only, for a block automerge leaves unmerged);
    ``ConfigError`` when the merge sets another parameter, which such a recipe cannot hold."""
    extra = sorted(set(params.values) - {"alpha"})
    if extra:
        raise ConfigError(
            f"--format {output_format}: the recipe holds only alpha (per block), "
            f"this merge also sets {', '.join(extra)}"
        )
    alpha = params.values["alpha"]
    return {block: float(alpha[block]) if params.merges(block) else 0.0 for block in blocks}
