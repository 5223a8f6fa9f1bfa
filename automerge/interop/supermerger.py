"""supermerger (the A1111/Forge merge extension) recipes: what to type into its Merge tab to make
automerge's merge there.

The MBW weight string is one value per block in supermerger's order, base_alpha first: 26 for SD1/SD2
(``BASE,IN00…IN11,M00,OUT00…OUT11``), 20 for SDXL (``BASE,IN00…IN08,M00,OUT00…OUT08``; supermerger
appends VAE = 0, A's VAE, as automerge keeps it). Its alpha is B's share, as automerge's:
Weight sum = A·(1 − α) + B·α, Add difference = A + (B − C)·α. Values are written exactly (Python's
shortest repr), so the string parses back to the same floats.

supermerger also reads an extended SDXL form of 109 values (110 with VAE; its ``BLOCKIDXLLL``: CLIP-L
and CLIP-G apart, each transformer block of IN04–IN08, M00 and OUT00–OUT05 apart, TIME and LABEL);
automerge's SDXL blocks are the 20 of the short form, so the short form is written (every value of the
long form would repeat its block's). Its calcmodes (normal, cosineA/B, trainDifference, smoothAdd,
extract, tensor, self, plus random) have no TIES, DARE or DELLA, so those are refused.

Where the results differ (checked against supermerger 0b1c491): its SD2/SDXL OpenCLIP
``positional_embedding``, ``text_projection`` and ``logit_scale`` are not merged (automerge merges them
in BASE), and versions before its commit 2cbd062 (2025-11-27) put SD1 ``time_embed`` in OUT11 and
left SDXL's unmerged (automerge and later supermerger: IN00).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from automerge.errors import ConfigError
from automerge.interop._blocks import block_alphas
from automerge.merge import BlockParams

MODES: dict[str, tuple[str, str]] = {
    "weighted_sum": ("Weight sum", "normal"),
    "add_difference": ("Add difference", "normal"),
    "train_difference": ("Add difference", "trainDifference"),
}
"""automerge method → supermerger (mode, calcmode) that computes the same per key."""

XL_WEIGHTS = 20  # the short SDXL MBW string: BASE, IN00–IN08, M00, OUT00–OUT08

DIFFERENCES = (
    "SD2/SDXL OpenCLIP positional_embedding, text_projection and logit_scale are not merged by "
    "supermerger (automerge: BASE); supermerger before 2cbd062 (2025-11-27) puts SD1 time_embed in "
    "OUT11 and leaves SDXL's unmerged (automerge: IN00)"
)


@dataclass(frozen=True)
class SupermergerRecipe:
    mode: str  # "Weight sum", "Add difference"
    calcmode: str  # "normal", "trainDifference"
    weights_alpha: str  # the MBW string, base_alpha first
    models: tuple[str, ...]  # model_a, model_b(, model_c) file names

    def text(self, *, title: str) -> str:
        """What to set in supermerger's Merge tab, and a line for its presets file."""
        lines = [f"# supermerger recipe for {title} (automerge export --format supermerger)"]
        lines += [f"model_{letter}: {name}" for letter, name in zip("abc", self.models, strict=False)]
        lines += [
            f"mode: {self.mode}",
            f"calcmode: {self.calcmode}",
            "use MBW: on",
            f"weights alpha: {self.weights_alpha}",
            "# a line for supermerger's presets file (name<TAB>weights):",
            f"{title}\t{self.weights_alpha}",
            f"# where supermerger's result differs: {DIFFERENCES}",
        ]
        if len(self.weights_alpha.split(",")) == XL_WEIGHTS:
            lines.append(
                "# the short SDXL form (20 values); supermerger's extended 109-value form is not needed: "
                "automerge's blocks give each of its parts its block's value"
            )
        return "\n".join(lines) + "\n"


def supermerger_recipe(
    method: str, params: BlockParams, blocks: Sequence[str], models: Sequence[str]
) -> SupermergerRecipe:
    """The recipe for ``method`` with per-block ``params`` over the family's MBW ``blocks`` (without
    VAE); a block automerge leaves unmerged is 0 (A). ``ConfigError`` for what supermerger cannot do."""
    if method not in MODES:
        raise ConfigError(
            f"--format supermerger: supermerger has no '{method}' merge; it can make "
            f"{', '.join(MODES)} (export the checkpoint, or use automerge merge with recipe.yaml)"
        )
    weights = block_alphas(params, blocks, output_format="supermerger")
    mode, calcmode = MODES[method]
    return SupermergerRecipe(mode, calcmode, ",".join(map(repr, weights.values())), tuple(models))


def parse_mbw_weights(text: str) -> tuple[float, list[float]]:
    """(base_alpha, the other block weights), split as supermerger reads its weights field."""
    base, rest = text.split(",", 1)
    return float(base), [float(value) for value in rest.split(",")]
