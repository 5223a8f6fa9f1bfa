"""What ``automerge inspect`` reports: family, layout, dtypes, parameters per MBW block, unmerged keys.
Built from headers only (``Checkpoint.info``): no tensor data is read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from automerge.checkpoints.model import SourceModel


@dataclass
class BlockSummary:
    tensors: int = 0
    params: int = 0


@dataclass
class ModelSummary:
    path: str
    arch: str
    title: str
    layout: str
    dtypes: dict[str, int]  # dtype name → tensor count
    params: int
    blocks: dict[str, BlockSummary] = field(default_factory=dict)
    unmerged: list[str] = field(default_factory=list)
    ema: int = 0  # EMA tensors (dropped on export)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "arch": self.arch,
            "layout": self.layout,
            "dtypes": self.dtypes,
            "params": self.params,
            "blocks": {name: {"tensors": b.tensors, "params": b.params} for name, b in self.blocks.items()},
            "unmerged": self.unmerged,
            "ema_tensors": self.ema,
        }


def summarize(model: SourceModel) -> ModelSummary:
    arch, checkpoint = model.arch, model.checkpoint
    summary = ModelSummary(
        path=str(model.path),
        arch=arch.name,
        title=arch.title,
        layout=model.layout,
        dtypes={},
        params=0,
        blocks={block: BlockSummary() for block in arch.blocks},
    )
    dtypes: Counter[str] = Counter()
    for key in checkpoint.keys():
        info = checkpoint.info(key)
        dtypes[str(info.dtype).removeprefix("torch.")] += 1
        if not arch.is_exported(key):
            summary.ema += 1
            continue
        summary.params += info.numel
        block = arch.block_of(key, info.dtype)
        if block is None:
            summary.unmerged.append(key)
        else:
            summary.blocks[block].tensors += 1
            summary.blocks[block].params += info.numel
    summary.dtypes = dict(sorted(dtypes.items()))
    return summary
