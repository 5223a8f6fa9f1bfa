"""ComfyUI workflows (issue 17): the API JSON names only ComfyUI's stock nodes with exactly their
required inputs, the UI graph is the same graph, and the graph, run by an interpreter of ComfyUI's merge
semantics on tiny models, gives automerge's exported tensors, except where the export's notes say
ComfyUI differs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from automerge.arch import ARCHITECTURES, reference_keys
from automerge.checkpoints import open_model
from automerge.errors import ConfigError
from automerge.interop.comfyui import ComfyWorkflow, block_inputs, comfyui_workflow
from automerge.lora import extract_lora, read_lora, write_kohya_lora
from automerge.merge import BlockParams, export_merge, plan_merge, recipe_from_data

# The nodes the export may use: INPUT_TYPES()["required"] in declaration order (type, or FLOAT with
# its min and max) and RETURN_TYPES, copied from comfyanonymous/ComfyUI: nodes.py at e60e19b
# (CheckpointLoaderSimple), comfy_extras/nodes_model_merging.py at 3d3d14d (ModelMergeSubtract and
# ModelMergeAdd are the classes ModelSubtract and ModelAdd; CLIPMergeSubtract/Add: CLIPSubtract/Add),
# comfy_extras/nodes_model_merging_model_specific.py at 0c74543 (ModelMergeSD2 is ModelMergeSD1).
RATIO = ("FLOAT", 0.0, 1.0)
MULTIPLIER = ("FLOAT", -10.0, 10.0)
LORA_STRENGTH = ("FLOAT", -100.0, 100.0)  # LoraLoader (nodes.py)
SD1_BLOCKS = [
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}." for i in range(12)),
    *(f"middle_block.{i}." for i in range(3)),
    *(f"output_blocks.{i}." for i in range(12)),
    "out.",
]
SDXL_BLOCKS = [
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}" for i in range(9)),
    *(f"middle_block.{i}" for i in range(3)),
    *(f"output_blocks.{i}" for i in range(9)),
    "out.",
]
NODES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "CheckpointLoaderSimple": ({"ckpt_name": "COMBO"}, ("MODEL", "CLIP", "VAE")),
    "ModelMergeSubtract": ({"model1": "MODEL", "model2": "MODEL", "multiplier": MULTIPLIER}, ("MODEL",)),
    "ModelMergeAdd": ({"model1": "MODEL", "model2": "MODEL"}, ("MODEL",)),
    "CLIPMergeSimple": ({"clip1": "CLIP", "clip2": "CLIP", "ratio": RATIO}, ("CLIP",)),
    "CLIPMergeSubtract": ({"clip1": "CLIP", "clip2": "CLIP", "multiplier": MULTIPLIER}, ("CLIP",)),
    "CLIPMergeAdd": ({"clip1": "CLIP", "clip2": "CLIP"}, ("CLIP",)),
    "ModelMergeSD1": ({"model1": "MODEL", "model2": "MODEL"} | dict.fromkeys(SD1_BLOCKS, RATIO), ("MODEL",)),
    "ModelMergeSD2": ({"model1": "MODEL", "model2": "MODEL"} | dict.fromkeys(SD1_BLOCKS, RATIO), ("MODEL",)),
    "ModelMergeSDXL": (
        {"model1": "MODEL", "model2": "MODEL"} | dict.fromkeys(SDXL_BLOCKS, RATIO),
        ("MODEL",),
    ),
    "CheckpointSave": ({"model": "MODEL", "clip": "CLIP", "vae": "VAE", "filename_prefix": "STRING"}, ()),
    "LoraLoader": (
        {
            "model": "MODEL",
            "clip": "CLIP",
            "lora_name": "COMBO",
            "strength_model": LORA_STRENGTH,
            "strength_clip": LORA_STRENGTH,
        },
        ("MODEL", "CLIP"),
    ),
}
NAMES = {"a": "a.safetensors", "b": "b.safetensors", "c": "base.safetensors"}


def _params(
    family: str, alphas: Callable[[int, int], float], *, unmerged: tuple[str, ...] = ()
) -> BlockParams:
    """alpha = ``alphas(index, count)`` for each merged block, in the family's order."""
    blocks = ARCHITECTURES.get(family).merge_blocks
    per_block = {b: alphas(i, len(blocks)) for i, b in enumerate(blocks) if b not in unmerged}
    return BlockParams(
        values=MappingProxyType({"alpha": MappingProxyType(per_block)}), blocks=tuple(per_block)
    )


def _spread(low: float, high: float) -> Callable[[int, int], float]:
    """A different alpha for every block, from low to high (BASE and IN00 apart)."""
    return lambda index, count: round(low + (high - low) * index / (count - 1), 4)


def _workflow(
    method: str, family: str, params: BlockParams | None = None, *, high: float = 0.95
) -> ComfyWorkflow:
    params = params or _params(family, _spread(0.05, high))
    models = NAMES if method == "add_difference" else {"a": NAMES["a"], "b": NAMES["b"]}
    return comfyui_workflow(method, params, family, models, title="t trial 3", save_name="t-trial3")


CASES = [
    (method, high, family)
    for method, high in (("weighted_sum", 0.95), ("add_difference", 1.0), ("add_difference", 1.6))
    for family in ("sd1", "sd2", "sdxl")
]


# 1. The API JSON and the UI graph against ComfyUI's node definitions -------------------------------


@pytest.mark.parametrize(("method", "high", "family"), CASES)
def test_the_api_json_names_only_stock_nodes_with_exactly_their_inputs(
    method: str, high: float, family: str
) -> None:
    api = _workflow(method, family, high=high).api
    for node_id, node in api.items():
        required, _ = NODES[node["class_type"]]
        assert list(node["inputs"]) == list(required), node_id  # every required input, in order
        for name, value in node["inputs"].items():
            kind = required[name]
            if kind in ("MODEL", "CLIP", "VAE"):
                source, slot = value
                assert source in api and source != node_id, (node_id, name)
                outputs = NODES[api[source]["class_type"]][1]
                assert slot < len(outputs) and outputs[slot] == kind, (node_id, name)
            elif kind == "COMBO":
                assert value in NAMES.values()
            elif kind == "STRING":
                assert value == "checkpoints/t-trial3"
            else:
                assert isinstance(value, float) and kind[1] <= value <= kind[2], (node_id, name, value)
    classes = [node["class_type"] for node in api.values()]
    assert classes.count("CheckpointLoaderSimple") == (3 if method == "add_difference" else 2)
    assert classes.count("CheckpointSave") == 1


@pytest.mark.parametrize(("method", "high", "family"), CASES)
def test_the_ui_graph_is_the_api_graph(method: str, high: float, family: str) -> None:
    workflow = _workflow(method, family, high=high)
    api, graph = workflow.api, workflow.graph
    assert graph["version"] == 0.4
    nodes = {node["id"]: node for node in graph["nodes"]}
    notes = [node for node in graph["nodes"] if node["type"] == "Note"]  # the UI's own, never sent
    assert len(notes) == 1 and all(line in notes[0]["widgets_values"][0] for line in workflow.notes)
    assert {str(i) for i in nodes if nodes[i]["type"] != "Note"} == set(api)
    assert graph["last_node_id"] == max(nodes) and graph["last_link_id"] == len(graph["links"])
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"])
    for node_id, node in api.items():
        entry = nodes[int(node_id)]
        assert entry["type"] == node["class_type"]
        linked = [(name, value) for name, value in node["inputs"].items() if isinstance(value, list)]
        assert [i["name"] for i in entry["inputs"]] == [name for name, _ in linked]
        for slot, (ui_input, (_, (source, source_slot))) in enumerate(
            zip(entry["inputs"], linked, strict=True)
        ):
            link = links[ui_input["link"]]
            assert link[1:5] == [int(source), source_slot, int(node_id), slot] and link[5] == ui_input["type"]
            assert ui_input["link"] in nodes[int(source)]["outputs"][source_slot]["links"]
        widgets = [value for value in node["inputs"].values() if not isinstance(value, list)]
        assert entry["widgets_values"] == widgets  # floats in declaration order
        assert [o["type"] for o in entry["outputs"]] == list(NODES[node["class_type"]][1])
    leaving = sorted(i for node in graph["nodes"] for output in node["outputs"] for i in output["links"])
    assert leaving == sorted(links)  # every link leaves exactly one output


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_unet_key_gets_the_ratio_of_its_automerge_block(family: str) -> None:
    """ComfyUI's longest-prefix rule on every UNet key of a real checkpoint picks the input that
    carries the key's automerge block (time_embed/label_emb: IN00, out.: the last OUT, middle: M00)."""
    arch = ARCHITECTURES.get(family)
    inputs = block_inputs(family)
    keys = [ref.key for ref in reference_keys(family) if ref.key.startswith("model.diffusion_model.")]
    assert keys
    for key in keys:
        unet_key = key.removeprefix("model.diffusion_model.")
        assert _longest_prefix(inputs, unet_key) == arch.block_of(key, torch.float32), key
    assert inputs["time_embed."] == inputs["label_emb."] == "IN00" and inputs["out."] == arch.merge_blocks[-1]


def test_ratios_are_a_s_share_and_unmerged_blocks_keep_a() -> None:
    params = _params("sd1", lambda i, n: 0.25, unmerged=("IN05", "OUT11"))
    api = _workflow("weighted_sum", "sd1", params).api
    merge = next(node["inputs"] for node in api.values() if node["class_type"] == "ModelMergeSD1")
    assert merge["input_blocks.4."] == 0.75 and merge["input_blocks.5."] == 1.0
    assert merge["out."] == merge["output_blocks.11."] == 1.0
    clip = next(node["inputs"] for node in api.values() if node["class_type"] == "CLIPMergeSimple")
    assert clip["ratio"] == 0.75
    save = next(node for node in api.values() if node["class_type"] == "CheckpointSave")
    assert api[save["inputs"]["vae"][0]]["inputs"]["ckpt_name"] == "a.safetensors"  # A's VAE
    assert any("position_ids" in line for line in save["_meta"]["automerge"]["notes"])


def test_add_difference_above_one_scales_the_difference_so_ratios_stay_in_range() -> None:
    params = _params("sd1", _spread(0.0, 1.6))
    api = _workflow("add_difference", "sd1", params).api
    subtract = next(node["inputs"] for node in api.values() if node["class_type"] == "ModelMergeSubtract")
    merge = next(node["inputs"] for node in api.values() if node["class_type"] == "ModelMergeSD1")
    assert subtract["multiplier"] == 1.6 and merge["out."] == 0.0 and merge["time_embed."] < 1.0


# 2. The graph run on tiny models -----------------------------------------------------------------


class _Patched:
    """A ComfyUI model (MODEL or CLIP) as its merge nodes see it: the loaded weights by key, and per
    key the patches queued on it, (strength of the patch, the patch, what the weight keeps); a patch
    is ``(tensor,)`` or another model's ``[weight, *its patches]`` (comfy/model_patcher.py)."""

    def __init__(
        self, weights: Mapping[str, torch.Tensor], patches: dict[str, list[Any]] | None = None
    ) -> None:
        self.weights = weights
        self.patches = patches or {}

    def key_patches(self, prefix: str = "") -> dict[str, Any]:
        """Each weight with what is queued on it, for another model to queue (get_key_patches)."""
        return {
            key: [weight, *self.patches[key]] if key in self.patches else (weight,)
            for key, weight in self.weights.items()
            if key.startswith(prefix)
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as saved: a patched one computed in float32, the others as loaded."""
        return {
            key: _weight(self.patches[key], w) if key in self.patches else w
            for key, w in self.weights.items()
        }


def _weight(patches: list[Any], weight: torch.Tensor) -> torch.Tensor:
    """A patched weight in float32: per patch, w ← keep·w, then w += strength·patch (nothing added at
    strength 0); a nested patch is computed first (comfy/lora.py calculate_weight)."""
    out = weight.to(torch.float32, copy=True)
    for strength, value, keep in patches:
        if keep != 1.0:
            out *= keep
        patch = _weight(value[1:], value[0]) if isinstance(value, list) else value[0].float()
        if strength != 0.0:
            out += strength * patch
    return out


def _queue(
    model1: _Patched, model2: _Patched, *, unet: bool, weights: Callable[[str], tuple[float, float]]
) -> _Patched:
    """What every merge node does: a copy of model1 with each of model2's keys (its UNet keys, for a
    MODEL) queued with (strength, keep) = ``weights(key)``; the CLIP nodes skip position_ids and
    logit_scale, which stay model1's."""
    patches = {key: list(queued) for key, queued in model1.patches.items()}
    for key, value in model2.key_patches(UNET if unet else "").items():
        if key in model1.weights and (unet or not key.endswith(CLIP_SKIPPED)):
            strength, keep = weights(key)
            patches.setdefault(key, []).append((strength, value, keep))
    return _Patched(model1.weights, patches)


def _longest_prefix(ratios: Mapping[str, Any], key: str) -> Any:
    """ModelMergeBlocks: the value of the longest input name that starts ``key``, else the first."""
    matches = [name for name in ratios if key.startswith(name)]
    return ratios[max(matches, key=len)] if matches else next(iter(ratios.values()))


UNET = "diffusion_model."  # ComfyUI's UNet keys: the checkpoint's model.diffusion_model.* without "model."
CLIP_SKIPPED = (".position_ids", ".logit_scale")


def _load(path: Path) -> tuple[_Patched, _Patched, dict[str, torch.Tensor]]:
    """CheckpointLoaderSimple: (MODEL, CLIP, VAE); the file's other keys (the schedule) are not loaded."""
    tensors = load_file(str(path))
    unet = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model." + UNET)}
    text = {k: v for k, v in tensors.items() if k.startswith(("cond_stage_model.", "conditioner.embedders."))}
    return (
        _Patched(unet),
        _Patched(text),
        {k: v for k, v in tensors.items() if k.startswith("first_stage_model.")},
    )


def _blocks(model1: _Patched, model2: _Patched, **ratios: float) -> tuple[_Patched]:
    """ModelMergeSD1/SD2/SDXL (ModelMergeBlocks): ratio·w1 + (1 − ratio)·w2 per key prefix."""
    return (
        _queue(
            model1, model2, unet=True, weights=lambda key: _ratio(_longest_prefix(ratios, key[len(UNET) :]))
        ),
    )


def _ratio(ratio: float) -> tuple[float, float]:
    return 1.0 - ratio, ratio


NODE_FUNCTIONS: dict[str, Callable[..., tuple[Any, ...]]] = {
    "ModelMergeSD1": _blocks,
    "ModelMergeSD2": _blocks,
    "ModelMergeSDXL": _blocks,
    "ModelMergeSubtract": lambda model1, model2, multiplier: (
        _queue(model1, model2, unet=True, weights=lambda key: (-multiplier, multiplier)),
    ),
    "ModelMergeAdd": lambda model1, model2: (
        _queue(model1, model2, unet=True, weights=lambda key: (1.0, 1.0)),
    ),
    "CLIPMergeSimple": lambda clip1, clip2, ratio: (
        _queue(clip1, clip2, unet=False, weights=lambda key: _ratio(ratio)),
    ),
    "CLIPMergeSubtract": lambda clip1, clip2, multiplier: (
        _queue(clip1, clip2, unet=False, weights=lambda key: (-multiplier, multiplier)),
    ),
    "CLIPMergeAdd": lambda clip1, clip2: (_queue(clip1, clip2, unet=False, weights=lambda key: (1.0, 1.0)),),
    "CheckpointSave": lambda model, clip, vae, filename_prefix: (
        {"model." + k: v for k, v in model.state_dict().items()} | clip.state_dict() | vae,
    ),
}


def _lora_loader(
    folder: Path,
    family: str,
    model: _Patched,
    clip: _Patched,
    lora_name: str,
    strength_model: float,
    strength_clip: float,
) -> tuple[_Patched, _Patched]:
    """LoraLoader: each adapted weight gets the patch strength·ΔW queued (comfy.sd.load_lora_for_models,
    ``add_patches(patches, strength)``); ΔW = (alpha/rank)·up@down as automerge's LoRA tests pin it."""
    shapes = {"model." + k: w.shape for k, w in model.weights.items()} | {
        k: w.shape for k, w in clip.weights.items()
    }
    lora = read_lora(folder / lora_name, ARCHITECTURES.get(family), shapes=shapes)
    patched = []
    for target, strength, prefix in ((model, strength_model, "model."), (clip, strength_clip, "")):
        patches = {key: list(queued) for key, queued in target.patches.items()}
        for key in lora.keys():
            name = key.removeprefix(prefix) if prefix and key.startswith(prefix + UNET) else key
            if name in target.weights and (prefix or not key.startswith("model.")):
                delta = lora.delta(key, target.weights[name].shape)
                patches.setdefault(name, []).append((strength, (delta,), 1.0))
        patched.append(_Patched(target.weights, patches))
    return patched[0], patched[1]


def _run(
    api: Mapping[str, Any], checkpoints: Path, *, loras: Path | None = None, family: str = "sd1"
) -> dict[str, torch.Tensor]:
    """Run the API graph (node by node, each once its inputs exist) with the loaders reading
    ``checkpoints`` (and ``loras``); the tensors CheckpointSave writes."""
    outputs: dict[str, tuple[Any, ...]] = {}
    while len(outputs) < len(api):
        for node_id, node in api.items():
            links = [v for v in node["inputs"].values() if isinstance(v, list)]
            if node_id in outputs or any(source not in outputs for source, _ in links):
                continue
            args = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if node["class_type"] == "CheckpointLoaderSimple":
                outputs[node_id] = _load(checkpoints / args["ckpt_name"])
            elif node["class_type"] == "LoraLoader":
                assert loras is not None
                outputs[node_id] = _lora_loader(loras, family, **args)
            else:
                outputs[node_id] = NODE_FUNCTIONS[node["class_type"]](**args)
    (saved,) = (outputs[i][0] for i, node in api.items() if node["class_type"] == "CheckpointSave")
    return saved


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family_models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Path]]:
    """The tiny models in one folder (ComfyUI's models/checkpoints), B's logit_scale moved off A's
    (the tiny fine-tunes share it) so that the CLIP nodes skipping it shows."""
    family = request.param
    tiny = request.getfixturevalue("tiny_models" if family == "sd1" else "tiny_sdxl_models")
    folder = tmp_path_factory.mktemp(f"checkpoints-{family}")
    paths = {letter: folder / tiny[letter].name for letter in "abc"}
    for letter in "ac":
        paths[letter].symlink_to(tiny[letter])
    b = load_file(str(tiny["b"]))
    save_file({k: v + 0.5 if k.endswith(".logit_scale") else v for k, v in b.items()}, str(paths["b"]))
    return family, paths


SCHEDULE = {"betas", "alphas_cumprod", "alphas_cumprod_prev"}


@pytest.mark.parametrize(
    ("method", "high"), [("weighted_sum", 0.95), ("add_difference", 1.0), ("add_difference", 1.6)]
)
def test_the_graph_run_on_tiny_models_gives_automerge_s_export(
    family_models, method: str, high: float, tmp_path: Path
) -> None:
    """Tensor by tensor: equal up to float32 rounding, but for what the notes say ComfyUI does
    otherwise: the schedule buffers are not saved and the OpenCLIP logit_scale stays A's."""
    family, paths = family_models
    letters = ("a", "b", "c") if method == "add_difference" else ("a", "b")
    params = _params(family, _spread(0.05, high))
    workflow = comfyui_workflow(
        method, params, family, {x: paths[x].name for x in letters}, title="t trial 3", save_name="t-trial3"
    )
    theirs = _run(workflow.api, paths["a"].parent)
    recipe = recipe_from_data(
        {
            "models": {x: str(paths[x]) for x in letters},
            "method": method,
            "params": {"alpha": dict(params.values["alpha"])},
            "dtype": "fp32",
        },
        source="t",
    )
    plan = plan_merge(recipe, source="t")
    try:
        ours = load_file(str(export_merge(plan, tmp_path / "ours.safetensors")))
    finally:
        plan.close()
    a, b, c = (load_file(str(paths[x])) for x in ("a", "b", "c"))

    assert ours.keys() - theirs.keys() == SCHEDULE and theirs.keys() <= ours.keys()
    kept = sorted(key for key in theirs if key.endswith(".logit_scale"))
    assert kept == (["conditioner.embedders.1.model.logit_scale"] if family == "sdxl" else [])
    for key in kept:
        assert torch.equal(theirs[key], a[key].float()) and not torch.equal(a[key], b[key])
        assert not torch.equal(ours[key], theirs[key])  # automerge merged it with BASE
    scale = max(1.0, high) if method == "add_difference" else 1.0
    eps = torch.finfo(torch.float32).eps
    far = []
    for key in theirs.keys() - set(kept):
        if not theirs[key].is_floating_point():
            assert torch.equal(theirs[key], ours[key]), key  # position_ids: A's in both
            continue
        size = a[key].float().abs() + scale * (
            b[key].float().abs() + (c[key].float().abs() if len(letters) == 3 else 0)
        )
        if not torch.all((theirs[key].float() - ours[key]).abs() <= 8 * eps * size):
            far.append(key)
    assert far == []


def test_sources_with_loras_go_through_lora_loaders_and_the_graph_gives_automerge_s_export(
    family_models, tmp_path: Path
) -> None:
    """A LoRA on A (0.7) and another on B (−0.4), both made from the tiny family: LoraLoader nodes
    before the merge, and the graph's tensors equal automerge's export up to float32 rounding."""
    family, paths = family_models
    arch = ARCHITECTURES.get(family)
    lora_folder = tmp_path / "loras"
    lora_folder.mkdir()
    with (
        open_model(paths["c"]) as base,
        open_model(paths["a"]) as tuned_a,
        open_model(paths["b"]) as tuned_b,
    ):
        for name, tuned in (("one.safetensors", tuned_a), ("two.safetensors", tuned_b)):
            layers = extract_lora(base.checkpoint, tuned.checkpoint, arch, rank=3).layers
            write_kohya_lora(lora_folder / name, layers, arch)
    strengths = {"a": [("one.safetensors", 0.7)], "b": [("two.safetensors", -0.4)]}
    params = _params(family, _spread(0.1, 0.9))
    workflow = comfyui_workflow(
        "weighted_sum",
        params,
        family,
        {x: paths[x].name for x in "ab"},
        title="t",
        save_name="t",
        loras=strengths,
    )
    assert workflow.loras == ("one.safetensors", "two.safetensors")
    assert [n["class_type"] for n in workflow.api.values()].count("LoraLoader") == 2
    theirs = _run(workflow.api, paths["a"].parent, loras=lora_folder, family=family)
    recipe = recipe_from_data(
        {
            "models": {
                x: {"checkpoint": str(paths[x]), "loras": [{"path": str(lora_folder / f), "strength": s}]}
                for x, ((f, s),) in strengths.items()
            },
            "method": "weighted_sum",
            "params": {"alpha": dict(params.values["alpha"])},
            "dtype": "fp32",
        },
        source="t",
    )
    with plan_merge(recipe, source="t") as plan:
        ours = load_file(str(export_merge(plan, tmp_path / "ours.safetensors")))
    a, b = (load_file(str(paths[x])) for x in "ab")
    eps = torch.finfo(torch.float32).eps
    far = []
    for key in theirs:
        if not theirs[key].is_floating_point() or key.endswith(".logit_scale"):
            continue  # position_ids: A's in both; logit_scale: the CLIP nodes' documented skip
        size = a[key].float().abs() + b[key].float().abs() + ours[key].abs()
        if not torch.all((theirs[key].float() - ours[key]).abs() <= 8 * eps * size):
            far.append(key)
    assert far == []


# 3. What the stock nodes cannot make ---------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["ties", "dare", "slerp", "train_difference", "model_stock", "geometric_median"]
)
def test_methods_the_stock_nodes_cannot_make_are_refused_naming_what_they_make(method: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _workflow(method, "sd1")
    message = str(caught.value)
    assert message.startswith(f"--format comfyui: ComfyUI's stock merge nodes cannot make '{method}'")
    assert "they make weighted_sum, add_difference" in message and "\n" not in message


def test_a_second_parameter_a_merged_vae_and_two_models_of_one_name_are_refused() -> None:
    blocks = ARCHITECTURES.get("sd1").merge_blocks
    two = BlockParams(
        values=MappingProxyType({p: MappingProxyType(dict.fromkeys(blocks, 0.5)) for p in ("alpha", "beta")}),
        blocks=blocks,
    )
    with pytest.raises(ConfigError, match="only alpha .* also sets beta"):
        _workflow("weighted_sum", "sd1", two)
    with_vae = (*blocks, "VAE")
    vae = BlockParams(
        values=MappingProxyType({"alpha": MappingProxyType(dict.fromkeys(with_vae, 0.5))}), blocks=with_vae
    )
    with pytest.raises(ConfigError, match=r"merges the VAE \(alpha.VAE = 0.5\) and ComfyUI has no node"):
        _workflow("weighted_sum", "sd1", vae)
    twins = {"a": "model.safetensors", "b": "model.safetensors"}
    with pytest.raises(ConfigError, match="models a and b are both named 'model.safetensors'"):
        comfyui_workflow(
            "weighted_sum", _params("sd1", _spread(0, 1)), "sd1", twins, title="t", save_name="t"
        )
