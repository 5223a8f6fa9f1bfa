"""The live engine: sources resident on the device, merged in place into the live weights.

Layout. For every block, each source's tensors are packed into one flat buffer (``sources[name][block]``)
and the merged weights into one flat output buffer. ``live_parameters()`` gives every parameter of the
live diffusers modules as a *view* of those output buffers (through the same key rules the exporter and
the loader use: q/k/v rows of a fused OpenCLIP tensor, squeezed 1×1 convs, a transposed projection);
``render.modules.bind_modules`` builds the modules around them. ``apply(params)`` re-merges only the
blocks whose parameters changed, writing into those buffers: no per-trial allocation of model-sized
buffers, no copy into the modules, no file. The engine holds tensors only; it builds no modules.

Per block, the cheapest exact path is used (``merge_into``): a method's fused ``inplace`` op on the
whole flat block (weighted sum: one ``torch.lerp(out=...)``), else the element-wise method through a
chunk-sized scratch buffer, else the method per key (slerp, ...: per-tensor statistics, per-key
seeds). The export goes through the same ``merge_into``, so both compute the same bits. Task
arithmetic (ties, dare, dare_ties, della) is the exception: its per-key ranks and draws are made once
per block and kept beside the sources, and each re-merge runs element-wise over the flat block
(``_sparse_live``, equal bit for bit to the export's keys; ``EngineOptions.task_statistics``).

LoRAs. A source's LoRAs are applied once, when it is loaded (``MergePlan.load``, as the export reads
it). A LoRA whose strength a study searches is *live* (``EngineOptions.live_loras``): for its source
the engine also keeps the checkpoint's own tensors of the keys its LoRAs adapt (in the file's dtype,
beside the source; LoRAs are added in float32), and when a strength changes it recomputes those keys of the source with the same
``apply_loras`` and re-merges their blocks: nothing is read again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from automerge.arch import Architecture
from automerge.checkpoints import TensorInfo
from automerge.lora import Lora, apply_loras
from automerge.merge._sparse_live import LiveTaskArithmetic, statistics_bytes
from automerge.merge.methods import check_finite, merge_into, noise_for
from automerge.merge.params import BlockParams, changed_blocks
from automerge.merge.plan import MergePlan

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """One tensor key inside its block's flat buffers."""

    key: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class _Block:
    name: str
    slots: list[_Slot] = field(default_factory=list)
    numel: int = 0
    sources: dict[str, torch.Tensor] = field(default_factory=dict)  # letter → flat (storage dtype)
    out: torch.Tensor | None = None  # flat (live dtype) on the device; live parameters view it
    source_magnitude: float = 0.0  # max |x| over every source tensor of the block
    lora_raw: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # letter → slot → own tensor
    live_loras: set[str] = field(default_factory=set)  # names of the live LoRAs adapting the block


@dataclass(frozen=True)
class EngineOptions:
    """Where and in which precision the engine keeps things.

    ``dtype``: the live modules' dtype (fp32 on CPU, fp16/bf16 on GPU). ``source_dtype``: storage of the
    resident sources (default: ``dtype``; fp16/bf16 halves memory). ``offload``: keep sources in pinned
    host memory and stream them to the device block by block (for small GPUs).
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    source_dtype: torch.dtype | None = None
    offload: bool = False
    chunk_numel: int | None = None  # elements per chunk of element-wise merges (None: by device)
    live_loras: frozenset[str] = frozenset()  # LoRAs whose strength may change between applies
    # ties, dare, dare_ties, della: keep per-element ranks / draws beside the sources for fast exact
    # re-merges (``_sparse_live``; 4–8 bytes per element per model); False merges them key by key
    task_statistics: bool = True
    # ties, dare, dare_ties on a CPU: one compiled pass per key (``_fused_cpu``) where it can be built;
    # False: torch's element-wise passes (the same bits)
    fused_cpu: bool = True


def live_keys(plan: MergePlan) -> Iterator[tuple[str, str, TensorInfo]]:
    """(block, key, header info) of every key of model A that feeds a live module, in A's order: what
    the engine holds per source and merges (``--dry-run`` sizes the same keys)."""
    primary = plan.primary.checkpoint
    for key in primary.keys():
        info = primary.info(key)
        block = plan.arch.block_of(key, info.dtype)
        if block is not None and plan.arch.targets(key):
            yield block, key, info


def task_statistics_bytes(plan: MergePlan, *, alpha_only_blocks: Collection[str] = ()) -> tuple[int, int]:
    """(bytes of the per-element ranks / draws the engine keeps for ties, dare, dare_ties or della
    over the merged blocks, bytes of the merged deltas it keeps for ``alpha_only_blocks``, whose α
    alone changes between applies); (0, 0) for other methods (``--dry-run`` counts them)."""
    numel: dict[str, int] = {}
    for block, _key, info in live_keys(plan):
        if plan.params.merges(block):
            numel[block] = numel.get(block, 0) + info.numel
    size = partial(
        statistics_bytes, plan.method, models=len(plan.model_names), compute_dtype=plan.compute_dtype
    )
    alpha_only = sum(n for block, n in numel.items() if block in alpha_only_blocks)
    return size(numel=sum(numel.values()))[0], size(numel=alpha_only)[1]


def statistics_fit(needed: int, free: int) -> bool:
    """Whether the fast task-arithmetic statistics (``needed`` bytes) go on a GPU with ``free`` bytes
    left after the sources: at most half of it, the rest kept for the renders' activations."""
    return needed <= free // 2


def held_sources(plan: MergePlan) -> dict[str, str]:
    """Each source's letter → the letter whose tensors the engine holds for it: the same file given
    twice (e.g. a == b) with the same LoRAs is held once."""
    first: dict[tuple[Path, tuple[str, ...]], str] = {}

    def identity(name: str) -> tuple[Path, tuple[str, ...]]:
        return plan.sources[name].path.resolve(), tuple(lora for lora, _ in plan.loras.get(name, ()))

    for name in plan.sources:
        first.setdefault(identity(name), name)
    return {name: first[identity(name)] for name in plan.sources}


class LiveEngine:
    """Holds a plan's sources and merged weights; ``apply`` re-merges the changed blocks in place."""

    def __init__(self, plan: MergePlan, options: EngineOptions | None = None) -> None:
        self.plan = plan
        self.options = options or EngineOptions()
        self.device = torch.device(self.options.device)
        self.arch: Architecture = plan.arch
        self._blocks = self._layout()
        self._lora_strengths = dict(plan.params.lora_strengths)  # what the resident sources carry
        self._live_loras = self._device_loras()
        self._load_sources()
        self._task = self._task_arithmetic()
        self._applied: BlockParams | None = None

    # -- construction ------------------------------------------------------------------------------

    def _layout(self) -> dict[str, _Block]:
        """Blocks → keys with live targets, in A's key order, with their flat offsets."""
        blocks = {name: _Block(name) for name in self.arch.blocks}
        for block, key, info in live_keys(self.plan):
            target = blocks[block]
            target.slots.append(_Slot(key, target.numel, info.shape))
            target.numel += info.numel
        return {name: block for name, block in blocks.items() if block.slots}

    def _device_loras(self) -> dict[str, list[tuple[str, Lora]]]:
        """Each source's LoRAs, when one of them is live, with their factors where the sources are
        (moved once; their deltas are recomputed there when a strength changes)."""
        live = self.options.live_loras
        unknown = live - set(self.plan.params.lora_strengths)
        if unknown:
            raise ValueError(f"live LoRAs {sorted(unknown)} are not in the plan")
        where = torch.device("cpu") if self.options.offload else self.device
        return {
            name: [(lora_name, lora.to(where)) for lora_name, lora in entries]
            for name, entries in self.plan.loras.items()
            if any(lora_name in live for lora_name, _ in entries)
        }

    def _task_arithmetic(self) -> LiveTaskArithmetic | None:
        """The fast exact merge of ties, dare, dare_ties and della (None for other methods, or when
        ``task_statistics`` is off): its statistics live where the sources do."""
        method, compute = self.plan.method, self.plan.compute_dtype
        if not self.options.task_statistics or not LiveTaskArithmetic.handles(method, compute):
            return None
        keep_on = torch.device("cpu") if self.options.offload else self.device
        if keep_on.type == "cuda":
            needed = task_statistics_bytes(self.plan)[0]
            free, _total = torch.cuda.mem_get_info(keep_on)
            if not statistics_fit(needed, free):
                _log.warning(
                    "%s re-merges key by key: its per-element ranks/draws (%.1f GiB) do not fit in half of "
                    "the %.1f GiB the GPU has free beside the sources (the renders need the rest)",
                    method.name,
                    needed / 2**30,
                    free / 2**30,
                )
                return None
        return LiveTaskArithmetic(
            method,
            seed=self.plan.seed,
            compute_dtype=compute,
            device=self.device,
            keep_on=torch.device("cpu") if self.options.offload else self.device,
            staged=self.options.offload,
            chunk_numel=self.options.chunk_numel,
            fused=self.options.fused_cpu,
        )

    def _load_sources(self) -> None:
        storage = self.options.source_dtype or self.options.dtype
        where = torch.device("cpu") if self.options.offload else self.device
        pin = self.options.offload and self.device.type == "cuda"
        twins = held_sources(self.plan)
        for block in self._blocks.values():
            for name, model in self.plan.sources.items():
                twin = twins[name]
                if twin != name:
                    block.sources[name] = block.sources[twin]
                    continue
                flat = torch.empty(block.numel, dtype=storage, device=where, pin_memory=pin)
                for index, slot in enumerate(block.slots):
                    part = flat[slot.offset : slot.offset + slot.numel]
                    if name in self._live_loras and self.plan.loras_on(name, slot.key):
                        raw = model.checkpoint.load(slot.key).to(where)
                        block.lora_raw.setdefault(name, {})[index] = raw
                        block.live_loras.update(self._lora_names_on(name, slot.key))
                        part.copy_(self._with_loras(name, slot.key, raw).reshape(-1))
                    else:
                        part.copy_(self.plan.load(name, slot.key).reshape(-1))
                    # checked as stored: a value beyond fp16's range in an fp32 file is caught too
                    magnitude = check_finite(part, model=f"{name} ({model.path.name})", key=slot.key)
                    block.source_magnitude = max(block.source_magnitude, magnitude)
                block.sources[name] = flat
            block.out = torch.empty(block.numel, dtype=self.options.dtype, device=self.device)

    # -- merging -----------------------------------------------------------------------------------

    def _lora_names_on(self, name: str, key: str) -> set[str]:
        return {lora_name for lora_name, lora in self._live_loras[name] if key in lora.layers}

    def _with_loras(self, name: str, key: str, raw: torch.Tensor) -> torch.Tensor:
        """Source ``name``'s ``key`` from its own tensor ``raw`` and its LoRAs at the current strengths:
        the computation of ``MergePlan.load`` (``apply_loras``), on the sources' device."""
        applied = [
            (lora, self._lora_strengths[lora_name])
            for lora_name, lora in self._live_loras[name]
            if key in lora.layers
        ]
        return apply_loras(raw.float(), key, applied)

    def _refresh_lora_sources(self, params: BlockParams) -> set[str]:
        """Recompute the sources' keys adapted by LoRAs whose strength ``params`` changes; returns
        the blocks that must be re-merged."""
        if set(params.lora_strengths) != set(self._lora_strengths):
            raise ValueError(
                f"parameters for LoRAs {sorted(params.lora_strengths)}, the plan has {sorted(self._lora_strengths)}"
            )
        changed = {
            name for name, strength in params.lora_strengths.items() if self._lora_strengths[name] != strength
        }
        if not changed:
            return set()
        fixed = changed - self.options.live_loras
        if fixed:
            raise ValueError(f"LoRA strengths {sorted(fixed)} changed, but the engine holds them fixed")
        self._lora_strengths.update(params.lora_strengths)
        refreshed = set()
        try:
            for block in self._blocks.values():
                if not block.live_loras & changed:
                    continue
                refreshed.add(block.name)
                for name, raws in block.lora_raw.items():
                    for index, raw in raws.items():
                        slot = block.slots[index]
                        part = block.sources[name][slot.offset : slot.offset + slot.numel]
                        part.copy_(self._with_loras(name, slot.key, raw).reshape(-1))
                        magnitude = check_finite(part, model=f"{name} with its LoRAs", key=slot.key)
                        block.source_magnitude = max(block.source_magnitude, magnitude)
        except BaseException:  # e.g. a strength that overflows fp16: redo the half-updated sources next time
            self._lora_strengths.update(dict.fromkeys(changed, math.nan))
            raise
        return refreshed

    def apply(self, params: BlockParams) -> set[str]:
        """Re-merge the blocks whose parameters changed since the last ``apply`` (LoRA strengths
        included); returns them."""
        refreshed = self._refresh_lora_sources(params)
        if self._task is not None:
            self._task.sources_changed(refreshed)
        todo = (changed_blocks(self._applied, params) | refreshed) & set(self._blocks)
        if self._applied is None:
            todo = set(self._blocks)
        for name in todo:
            self._merge_block(self._blocks[name], params)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._applied = params
        return todo

    def _sources_on_device(self, block: _Block) -> dict[str, torch.Tensor]:
        """The block's sources where the merge runs: resident ones as they are; offloaded ones copied
        to the device for this merge and dropped after it (on a CPU a staging copy too, so that the
        CPU tests run the path a GPU runs; twins of one file are copied once)."""
        if not self.options.offload:
            return block.sources
        staged: dict[int, torch.Tensor] = {}
        for flat in block.sources.values():
            if id(flat) not in staged:
                copy = torch.empty(flat.shape, dtype=flat.dtype, device=self.device)
                staged[id(flat)] = copy.copy_(flat, non_blocking=self.device.type == "cuda")
        return {name: staged[id(flat)] for name, flat in block.sources.items()}

    def _merge_block(self, block: _Block, params: BlockParams) -> None:
        """Element-wise methods merge the whole flat block at once; the others go key by key,
        because their statistics (top-k, norms) and random streams are per key, as in the export."""
        assert block.out is not None
        sources = self._sources_on_device(block)
        if not params.merges(block.name):  # e.g. the VAE when no parameter names it: model A's
            block.out.copy_(sources["a"])
            return
        method, values = self.plan.method, params.for_block(block.name)
        weights = params.model_weights(block.name, self.plan.model_names)
        models = [sources[name] for name in self.plan.model_names]
        base = sources[self.plan.base_name] if self.plan.base_name else None
        if self._task is not None and base is not None:
            merged = self._task.merge_block(
                block.name,
                block.slots,
                block.out,
                models,
                base,
                params=values,
                weights=weights,
                source_magnitude=block.source_magnitude,
            )
            if merged:  # else its sign election is not provably exact here: key by key below
                return
        if method.elementwise and not method.random:
            self._merge_into(
                block.out,
                models,
                base,
                values,
                key=f"block {block.name}",
                seed_key="",
                block=block,
                weights=weights,
            )
            return
        for slot in block.slots:
            part = slice(slot.offset, slot.offset + slot.numel)
            self._merge_into(
                block.out[part].view(slot.shape),
                [m[part].view(slot.shape) for m in models],
                None if base is None else base[part].view(slot.shape),
                values,
                key=slot.key,
                seed_key=slot.key,
                block=block,
                weights=weights,
            )

    def _merge_into(
        self,
        out: torch.Tensor,
        models: list[torch.Tensor],
        base: torch.Tensor | None,
        values: Mapping[str, float],
        *,
        key: str,
        seed_key: str,
        block: _Block,
        weights: Sequence[float] | None,
    ) -> None:
        method = self.plan.method
        noise = noise_for(seed_key, self.plan.seed) if method.random else None
        merge_into(
            out,
            method,
            models,
            base,
            key=key,
            params=values,
            noise=noise,
            weights=weights,
            compute_dtype=self.plan.compute_dtype,
            chunk_numel=self.options.chunk_numel,
            source_magnitude=block.source_magnitude,
        )

    # -- the live weights --------------------------------------------------------------------------

    def live_parameters(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{component: {diffusers parameter name: view of the merged weights}}`` for every live
        parameter; bound into modules, they follow every ``apply``."""
        views: dict[str, dict[str, torch.Tensor]] = {}
        for block in self._blocks.values():
            for slot in block.slots:
                for target in self.arch.targets(slot.key):
                    views.setdefault(target.component, {})[target.name] = target.apply(
                        self._view(block, slot)
                    )
        return views

    @staticmethod
    def _view(block: _Block, slot: _Slot) -> torch.Tensor:
        assert block.out is not None
        return block.out[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def live_tensor(self, key: str) -> torch.Tensor:
        """The current merged value of original-layout ``key`` (a view; for tests and export checks)."""
        for block in self._blocks.values():
            for slot in block.slots:
                if slot.key == key:
                    return self._view(block, slot)
        raise KeyError(key)

    def live_keys(self) -> list[str]:
        return [slot.key for block in self._blocks.values() for slot in block.slots]

    def block_bytes(self) -> dict[str, int]:
        """Bytes of each block's output buffer (for benchmarks)."""
        return {name: b.numel * self.options.dtype.itemsize for name, b in self._blocks.items()}
