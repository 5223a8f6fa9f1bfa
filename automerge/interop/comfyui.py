"""ComfyUI workflows: the same per-block merge with ComfyUI's stock nodes, as the API ("prompt") JSON
that ``POST /prompt`` runs and as the UI graph (format version 0.4) that loads by drag and drop.

The graph: one ``CheckpointLoaderSimple`` per model, then a ``LoraLoader`` per LoRA on it (the same
strength on model and text encoders: ComfyUI adds strength·(alpha/rank)·up@down in float32, as
automerge does); the UNet through ``ModelMergeSD1`` (SD2:
``ModelMergeSD2``, SDXL: ``ModelMergeSDXL``), one ratio per key prefix; the text encoders through
``CLIPMergeSimple`` (one ratio, BASE); ``CheckpointSave`` with A's VAE, as automerge keeps it. A merge
node patches a copy of model1 with model2: w = ratio·w1 + (1 − ratio)·w2, the ratio of the longest
block input that prefixes the UNet key (the first input when none does). ComfyUI's ratio is model1's
share, so ratio = 1 − alpha. Add difference, A + alpha·(B − C), is ratio·A + (1 − ratio)·(A + k·(B − C))
with ratio = 1 − alpha/k: ``ModelMergeSubtract`` (B, C, multiplier k), ``ModelMergeAdd`` onto A, then
the per-block merge with A (``CLIPMergeSubtract``/``CLIPMergeAdd`` for the text encoders); k = 1 unless
some alpha exceeds 1 (a ratio must lie in [0, 1]), then the largest alpha.

Checked against ComfyUI's source (comfyanonymous/ComfyUI): comfy_extras/nodes_model_merging.py at
3d3d14d (node inputs, the merge arithmetic, CLIP nodes skipping ``position_ids``/``logit_scale``),
comfy_extras/nodes_model_merging_model_specific.py at 0c74543 (block inputs; SDXL's without a trailing
dot), comfy/lora.py at 41444b5 (``calculate_weight``: float32, w·strength_model + strength·patch),
comfy/model_patcher.py at e73c917 (``add_patches``, ``get_key_patches``), nodes.py at e60e19b
(``CheckpointLoaderSimple``), comfy/supported_models.py at c4d1a8d (what ``CheckpointSave`` writes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from automerge.arch import ARCHITECTURES, VAE_BLOCK
from automerge.errors import ConfigError
from automerge.interop._blocks import block_alphas
from automerge.merge import BlockParams

METHODS = ("weighted_sum", "add_difference")

MERGE_NODES: dict[str, tuple[str, int, str]] = {
    "sd1": ("ModelMergeSD1", 12, "."),
    "sd2": ("ModelMergeSD2", 12, "."),  # ComfyUI registers ModelMergeSD1's class under this name too
    "sdxl": ("ModelMergeSDXL", 9, ""),  # its block inputs have no trailing dot
}
"""automerge family → (ComfyUI merge node, input/output blocks, the suffix of their block inputs)."""

UNET_PREFIX = "model.diffusion_model."  # ComfyUI's diffusion_model.* keys, in the checkpoint's layout


def block_inputs(family: str) -> dict[str, str]:
    """The block inputs of the family's ComfyUI merge node, in its order → the automerge block whose
    alpha each takes (automerge's own block rule applied to the prefix ComfyUI matches)."""
    _, levels, dot = MERGE_NODES[family]
    names = [
        "time_embed.",
        "label_emb.",
        *(f"input_blocks.{i}{dot}" for i in range(levels)),
        *(f"middle_block.{i}{dot}" for i in range(3)),
        *(f"output_blocks.{i}{dot}" for i in range(levels)),
        "out.",
    ]
    arch = ARCHITECTURES.get(family)
    inputs = {}
    for name in names:
        block = arch.block_of(f"{UNET_PREFIX}{name.rstrip('.')}.weight", torch.float32)
        if block is None:  # a bug: every UNet prefix is in some block of automerge's rule
            raise RuntimeError(f"ComfyUI's {name} has no automerge block in {family}")
        inputs[name] = block
    return inputs


@dataclass(frozen=True)
class ComfyWorkflow:
    """One merge as a ComfyUI workflow, in both of its file forms."""

    api: dict[str, Any]  # node id → {"inputs", "class_type", "_meta"}: what POST /prompt runs
    graph: dict[str, Any]  # the UI graph: nodes, links, a Note node with ``notes``, version 0.4
    checkpoints: tuple[str, ...]  # the file names it loads from ComfyUI's models/checkpoints
    notes: tuple[str, ...]  # where ComfyUI's result or conventions differ from automerge's
    loras: tuple[str, ...] = ()  # the file names it loads from ComfyUI's models/loras

    def api_json(self) -> str:
        return json.dumps(self.api, indent=2, ensure_ascii=False) + "\n"

    def graph_json(self) -> str:
        return json.dumps(self.graph, indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class _Link:
    node: int
    slot: int
    type: str  # "MODEL" | "CLIP" | "VAE"


@dataclass(frozen=True)
class _Node:
    id: int
    class_type: str
    title: str
    inputs: tuple[tuple[str, _Link | float | str], ...]  # in ComfyUI's declaration order
    outputs: tuple[str, ...]  # output types, by slot


def comfyui_workflow(
    method: str,
    params: BlockParams,
    family: str,
    models: Mapping[str, str],
    *,
    title: str,
    save_name: str,
    loras: Mapping[str, Sequence[tuple[str, float]]] | None = None,
) -> ComfyWorkflow:
    """The workflow of ``method`` with per-block ``params`` on the checkpoint file ``models`` (by letter:
    a, b and, for add_difference, c), each with its ``loras`` (file name, strength) applied first; a
    block automerge leaves unmerged has alpha 0 (A). The save node writes ``checkpoints/<save_name>`` in
    ComfyUI's output folder. ``ConfigError`` for what the stock nodes cannot express."""
    loras = {letter: list(entries) for letter, entries in (loras or {}).items() if entries}
    alphas = _check(method, params, family, models, loras)
    scale = max(1.0, *alphas.values()) if method == "add_difference" else 1.0
    nodes = _merge_nodes(method, alphas, family, models, loras, scale=scale, save_name=save_name)
    notes = differences(family, method, scale=scale, loras=bool(loras))
    return ComfyWorkflow(
        api=_api_prompt(nodes, title=title, notes=notes),
        graph=_ui_graph(nodes, title=title, notes=notes),
        checkpoints=tuple(models.values()),
        notes=notes,
        loras=tuple(dict.fromkeys(name for entries in loras.values() for name, _ in entries)),
    )


def _check(
    method: str,
    params: BlockParams,
    family: str,
    models: Mapping[str, str],
    loras: Mapping[str, Sequence[tuple[str, float]]],
) -> dict[str, float]:
    """The alpha of every block, or ``ConfigError`` for a merge ComfyUI's stock nodes cannot make."""
    if method not in METHODS:
        raise ConfigError(
            f"--format comfyui: ComfyUI's stock merge nodes cannot make '{method}'; they make "
            f"{', '.join(METHODS)} (export the checkpoint and load that in ComfyUI instead)"
        )
    if family not in MERGE_NODES:
        raise ConfigError(
            f"--format comfyui: ComfyUI workflows are written for sd1, sd2 and sdxl, not {family}"
        )
    if params.merges(VAE_BLOCK) and params.values["alpha"][VAE_BLOCK] != 0.0:
        raise ConfigError(
            "--format comfyui: this merge merges the VAE (alpha.VAE = "
            f"{params.values['alpha'][VAE_BLOCK]!r}) and ComfyUI has no node that merges VAEs"
        )
    names: dict[str, str] = {}
    for letter, name in models.items():
        if name in names:
            raise ConfigError(
                f"--format comfyui: models {names[name]} and {letter} are both named '{name}' and ComfyUI "
                "finds checkpoints by file name in models/checkpoints; rename one"
            )
        names[name] = letter
    for letter, entries in loras.items():
        for name, strength in entries:
            if abs(strength) > LORA_STRENGTH_LIMIT:
                raise ConfigError(
                    f"--format comfyui: LoRA {name} on model {letter} has strength {strength!r}; "
                    f"LoraLoader takes -{LORA_STRENGTH_LIMIT:g} to {LORA_STRENGTH_LIMIT:g}"
                )
    return block_alphas(params, ARCHITECTURES.get(family).merge_blocks, output_format="comfyui")


class _Graph:
    """The nodes of a workflow, added in execution order (ids from 1, as ComfyUI's UI numbers them)."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []

    def add(
        self, class_type: str, title: str, inputs: Sequence[tuple[str, Any]], outputs: tuple[str, ...] = ()
    ) -> int:
        self.nodes.append(_Node(len(self.nodes) + 1, class_type, title, tuple(inputs), outputs))
        return len(self.nodes)


LOADER_OUTPUTS = ("MODEL", "CLIP", "VAE")  # CheckpointLoaderSimple's outputs, by slot
LORA_STRENGTH_LIMIT = 100.0  # LoraLoader's strength_model / strength_clip range (nodes.py)


def _merge_nodes(
    method: str,
    alphas: Mapping[str, float],
    family: str,
    models: Mapping[str, str],
    loras: Mapping[str, Sequence[tuple[str, float]]],
    *,
    scale: float,
    save_name: str,
) -> list[_Node]:
    """Loaders (and LoRA loaders), the difference A + k·(B − C) (add_difference), the two merges with
    A, the save."""
    graph = _Graph()
    loaders = {
        letter: graph.add(
            "CheckpointLoaderSimple", f"{letter.upper()}: {name}", [("ckpt_name", name)], LOADER_OUTPUTS
        )
        for letter, name in models.items()
    }
    source = {
        kind: {letter: _Link(node, slot, kind) for letter, node in loaders.items()}
        for slot, kind in enumerate(LOADER_OUTPUTS)
    }
    for letter, entries in loras.items():
        for name, strength in entries:
            node = graph.add(
                "LoraLoader",
                f"{letter.upper()} + {name} × {strength:g}",
                [
                    ("model", source["MODEL"][letter]),
                    ("clip", source["CLIP"][letter]),
                    ("lora_name", name),
                    ("strength_model", strength),
                    ("strength_clip", strength),
                ],
                ("MODEL", "CLIP"),
            )
            source["MODEL"][letter], source["CLIP"][letter] = _Link(node, 0, "MODEL"), _Link(node, 1, "CLIP")
    other = {"MODEL": source["MODEL"]["b"], "CLIP": source["CLIP"]["b"]}
    if method == "add_difference":
        for kind, prefix in (("MODEL", "ModelMerge"), ("CLIP", "CLIPMerge")):
            other[kind] = _difference(graph, prefix, source[kind], scale=scale)
    share = "1 − alpha" if scale == 1.0 else f"1 − alpha/{scale!r}"
    ratios = [(name, 1.0 - alphas[block] / scale) for name, block in block_inputs(family).items()]
    unet = graph.add(
        MERGE_NODES[family][0],
        f"UNet: A's share per block = {share}",
        [("model1", source["MODEL"]["a"]), ("model2", other["MODEL"]), *ratios],
        ("MODEL",),
    )
    text = graph.add(
        "CLIPMergeSimple",
        f"text encoders: A's share = {share} (BASE)",
        [("clip1", source["CLIP"]["a"]), ("clip2", other["CLIP"]), ("ratio", 1.0 - alphas["BASE"] / scale)],
        ("CLIP",),
    )
    merged = [
        ("model", _Link(unet, 0, "MODEL")),
        ("clip", _Link(text, 0, "CLIP")),
        ("vae", source["VAE"]["a"]),
    ]
    graph.add("CheckpointSave", "save (A's VAE)", [*merged, ("filename_prefix", f"checkpoints/{save_name}")])
    return graph.nodes


def _difference(graph: _Graph, prefix: str, source: Mapping[str, _Link], *, scale: float) -> _Link:
    """A + k·(B − C) of one kind of loader output (MODEL: the UNet, CLIP: the text encoders): the
    Subtract node makes k·B − k·C, the Add node adds that onto A."""
    one, two = ("model1", "model2") if prefix == "ModelMerge" else ("clip1", "clip2")
    kind = source["a"].type
    diff = graph.add(
        f"{prefix}Subtract",
        f"{scale!r}·(B − C)",
        [(one, source["b"]), (two, source["c"]), ("multiplier", scale)],
        (kind,),
    )
    total = graph.add(
        f"{prefix}Add", f"A + {scale!r}·(B − C)", [(one, source["a"]), (two, _Link(diff, 0, kind))], (kind,)
    )
    return _Link(total, 0, kind)


def differences(family: str, method: str, *, scale: float, loras: bool = False) -> tuple[str, ...]:
    """Where ComfyUI's conventions, and the checkpoint it saves, differ from automerge's."""
    last_out = f"OUT{MERGE_NODES[family][1] - 1:02d}"
    notes = [
        "ComfyUI's ratio is model 1's (A's) share: each ratio here is 1 − alpha"
        + ("" if scale == 1.0 else f"/{scale!r}, the multiplier of B − C (a ratio must lie in [0, 1])"),
        f"time_embed. and label_emb. take IN00's alpha and out. takes {last_out}'s, the blocks automerge "
        "(and supermerger) weight them with; the three middle_block inputs take M00's",
        "the text encoders get one ratio (BASE); ComfyUI's CLIP merge nodes skip *.position_ids and "
        "*.logit_scale, which stay A's (automerge copies position_ids from A too, but merges the OpenCLIP "
        "logit_scale of SD2/SDXL with BASE)",
        "ComfyUI computes each weight in float32 as ratio·w1 + (1 − ratio)·w2 (automerge: torch.lerp, "
        "A + alpha·(B − C)): the results agree up to float32 rounding",
        "CheckpointSave writes only its models' weights (no betas/alphas_cumprod schedule buffers) in the "
        "dtype ComfyUI runs them in (fp16 or bf16 on most GPUs; start it with --force-fp32 for float32), "
        "with its own metadata (prompt, workflow), to output/checkpoints/; the VAE is A's",
        "the UI shows a ratio to 2 decimals and rounds it to 0.01 when edited; the files hold the exact values",
    ]
    if loras:
        notes.append(
            "each LoRA goes through a LoraLoader before the merge, with its strength on the UNet and the "
            "text encoders alike, as automerge applies it; ComfyUI loads the files from models/loras"
        )
    if method == "add_difference":
        notes.insert(
            1,
            f"add difference A + alpha·(B − C) is ratio·A + (1 − ratio)·(A + {scale!r}·(B − C)): "
            "ModelMergeSubtract(B, C), ModelMergeAdd onto A, then the per-block merge with A",
        )
    return tuple(notes)


def _api_prompt(nodes: Sequence[_Node], *, title: str, notes: tuple[str, ...]) -> dict[str, Any]:
    """ComfyUI's API format: a link is ``[source node id, output slot]``. The notes ride in the save
    node's ``_meta`` (the server reads only ``inputs`` and ``class_type``; the UI, ``_meta.title``)."""
    prompt = {
        str(node.id): {
            "inputs": {
                name: [str(value.node), value.slot] if isinstance(value, _Link) else value
                for name, value in node.inputs
            },
            "class_type": node.class_type,
            "_meta": {"title": node.title},
        }
        for node in nodes
    }
    prompt[str(nodes[-1].id)]["_meta"]["automerge"] = {"title": title, "notes": list(notes)}
    return prompt


NODE_WIDTH, COLUMN_WIDTH, GAP = 360, 420, 40
NOTE_SIZE = (NODE_WIDTH, 420)


def _ui_graph(nodes: Sequence[_Node], *, title: str, notes: tuple[str, ...]) -> dict[str, Any]:
    """The UI graph: a link is ``[id, source id, source slot, target id, target input slot, type]``;
    a node lists its linked inputs (slots in order), its outputs with their links and its widgets'
    values in declaration order. A Note node (the UI's own, never run) holds ``notes``."""
    ends = [(node.id, slot, link) for node in nodes for slot, (_, link) in enumerate(_linked(node))]
    links = [
        [number, link.node, link.slot, target, slot, link.type]
        for number, (target, slot, link) in enumerate(ends, start=1)
    ]
    entries = [
        _ui_node(node, order, pos, links)
        for order, (node, pos) in enumerate(zip(nodes, _layout(nodes), strict=True))
    ]
    note = _note(
        len(nodes) + 1, order=len(nodes), text=f"{title} (automerge export --format comfyui)", notes=notes
    )
    return {
        "last_node_id": note["id"],
        "last_link_id": len(links),
        "nodes": [*entries, note],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {
            "ds": {"scale": 1.0, "offset": [0, 0]},
            "automerge": {"title": title, "notes": list(notes)},
        },
        "version": 0.4,
    }


def _ui_node(node: _Node, order: int, pos: tuple[float, float], links: list[list[Any]]) -> dict[str, Any]:
    incoming = [link for link in links if link[3] == node.id]
    return {
        "id": node.id,
        "type": node.class_type,
        "pos": list(pos),
        "size": [NODE_WIDTH, _height(node)],
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": [
            {"name": name, "type": link[5], "link": link[0]}
            for (name, _), link in zip(_linked(node), incoming, strict=True)
        ],
        "outputs": [
            {"name": kind, "type": kind, "links": _from(links, node.id, slot), "slot_index": slot}
            for slot, kind in enumerate(node.outputs)
        ],
        "title": node.title,
        "properties": {"Node name for S&R": node.class_type},
        "widgets_values": [value for _, value in node.inputs if not isinstance(value, _Link)],
    }


def _from(links: list[list[Any]], node: int, slot: int) -> list[int]:
    """The ids of the links that leave output ``slot`` of ``node``."""
    return [link[0] for link in links if link[1] == node and link[2] == slot]


def _linked(node: _Node) -> list[tuple[str, _Link]]:
    return [(name, value) for name, value in node.inputs if isinstance(value, _Link)]


def _height(node: _Node) -> int:
    """About what the UI draws: a title bar, then one row per input/output pair and per widget."""
    rows = max(len(_linked(node)), len(node.outputs)) + len(node.inputs) - len(_linked(node))
    return 46 + 24 * rows


def _layout(nodes: Sequence[_Node]) -> list[tuple[float, float]]:
    """Each node's position: a column per distance from the loaders, stacked top-down in it (the
    loaders below the Note)."""
    depth: dict[int, int] = {}
    next_y: dict[int, float] = {0: NOTE_SIZE[1] + 2 * GAP}
    positions = []
    for node in nodes:
        column = depth[node.id] = max((depth[link.node] + 1 for _, link in _linked(node)), default=0)
        y = next_y.get(column, GAP)
        next_y[column] = y + _height(node) + GAP
        positions.append((GAP + COLUMN_WIDTH * column, y))
    return positions


def _note(node_id: int, *, order: int, text: str, notes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "Note",
        "pos": [GAP, GAP],
        "size": list(NOTE_SIZE),
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "title": "automerge: where ComfyUI differs",
        "properties": {},
        "widgets_values": [text + "\n\n" + "\n\n".join(f"- {line}" for line in notes)],
        "color": "#432",
        "bgcolor": "#653",
    }
