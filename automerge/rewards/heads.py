"""The MLP score head shared by ImageReward and the LAION aesthetic predictor v2:
768 → 1024 → 128 → 64 → 16 → 1 with dropout between layers (inactive when scoring)."""

from __future__ import annotations

import torch
from torch import nn

_WIDTHS = (1024, 128, 64, 16, 1)
_DROPOUT = (0.2, 0.2, 0.1)


def score_head(in_features: int, *, relu: bool = False) -> nn.Sequential:
    """Linear layers at indices 0, 2, 4, 6, 7 (linear variant, as ImageReward's ``mlp.layers`` and
    ``sac+logos+ava1-l14-linearMSE.pth``) or 0, 3, 6, 9, 11 with ``relu`` (the ReLU variant)."""
    modules: list[nn.Module] = []
    width = in_features
    for index, out in enumerate(_WIDTHS):
        modules.append(nn.Linear(width, out))
        if index < len(_WIDTHS) - 1 and relu:
            modules.append(nn.ReLU())
        if index < len(_DROPOUT):
            modules.append(nn.Dropout(_DROPOUT[index]))
        width = out
    return nn.Sequential(*modules)


class ScoreHead(nn.Module):
    """``score_head`` under the attribute ``layers``, so its keys read ``layers.N.weight`` as in the
    published files; ``forward`` maps features (B, D) to scores (B,)."""

    def __init__(self, in_features: int, *, relu: bool = False) -> None:
        super().__init__()
        self.layers = score_head(in_features, relu=relu)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
